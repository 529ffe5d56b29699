"""Errors that mean "the caller gave us something we cannot use".

The command line turns these into one clear line on stderr and a non-zero exit, never a
traceback; the Celery tasks turn them into a permanent run failure with the message.
"""


class ProbeInputError(Exception):
    """Bad input: a missing file, an unreadable image, a model we cannot explain, ..."""


class UnsupportedModelError(ProbeInputError):
    """The model loads, but lacks what a probe needs (the message names what is missing)."""


class OutOfDeviceMemory(ProbeInputError):
    """The model and a batch of one do not fit the device's free memory."""
