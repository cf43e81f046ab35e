"""One error type per boundary; the CLI turns each into a one-line message and exit status 2."""


class LsdrError(Exception):
    """Base class of every error the CLI reports as one line (exit status 2)."""


class ConfigError(LsdrError):
    """A config file or override is wrong: unknown key, wrong type, missing required path."""


class DataError(LsdrError):
    """Shards or images cannot be read, or a stream yields nothing."""


class CheckpointError(LsdrError):
    """A checkpoint cannot be written or no valid checkpoint can be read."""


class SubmitError(LsdrError):
    """A SLURM submission failed (sbatch's own message is carried in the text)."""


class RunDirError(LsdrError):
    """The run directory cannot be written (a full disk, a vanished mount, no permission)."""
