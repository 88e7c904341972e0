"""Typed errors; the CLI maps each to an exit code in one place."""

from __future__ import annotations


class Conv2AttnError(Exception):
    """Base class. ``exit_code`` is what the command-line tool exits with."""

    exit_code = 3


class InputError(Conv2AttnError):
    """The user's file, model or options cannot be used; the message says what to do."""

    exit_code = 2


class InternalError(Conv2AttnError):
    """The tool produced something invalid: a bug to report, with ``--debug`` output."""

    exit_code = 3
