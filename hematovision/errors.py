"""The project's exception hierarchy: every message says what to do next."""


class HematovisionError(Exception):
    """Base of every error Hematovision raises on purpose."""


class DataError(HematovisionError):
    """A dataset, annotation or image cannot be used as given."""


class ImageUnreadable(DataError):
    """An image file is missing, truncated or not an image."""


class ModelInvalid(HematovisionError):
    """A model bundle or training run is missing, corrupt or inconsistent."""


class ConfigError(HematovisionError):
    """A configuration or profile value is unknown or out of range."""


class CalibrationError(HematovisionError):
    """A calibration image cannot give the measurement asked of it."""


class CameraUnavailable(HematovisionError):
    """A frame source cannot be opened or stopped delivering frames."""


class LinkFailed(HematovisionError):
    """A report could not be delivered to its receiver."""


class ImageTooLarge(ImageUnreadable):
    """An image has more pixels than the configured limit; refused before decoding where possible."""


class SendCancelled(LinkFailed):
    """A report send was stopped because the daemon is stopping; the report stays in the outbox."""
