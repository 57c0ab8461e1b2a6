"""The user-facing errors of AscendSpeed: input, flags or files that cannot work.

Every entry point catches `AscendSpeedError`, prints its message as one line (`error: ...`) and
exits with status 2; anything else is a bug and keeps its traceback. Each message names the flag,
file or field and what was expected. The built-in base next to ours (ValueError, RuntimeError)
says what kind of mistake it is, for callers that handle one kind.

This module imports nothing of the project, so every module may import it.
"""


class AscendSpeedError(Exception):
    """Bad input, flags or files; the message says which and what was expected."""


class ConfigError(AscendSpeedError, ValueError):
    """A flag value that cannot work; the message names the flag and what was expected."""


class ParallelLayoutError(ConfigError):
    """A world size / TP / PP combination that cannot be laid out."""


class PipelinePartitionError(ConfigError):
    """A layout the pipeline cannot run; the message names the flags and numbers."""


class EvalInputError(ConfigError):
    """A missing, unreadable or malformed evaluation input; the message names file and line."""


class DatasetError(AscendSpeedError, ValueError):
    """Data that cannot produce the requested samples: flags, prefixes or `.bin/.idx` files."""


class PreprocessError(AscendSpeedError, ValueError):
    """Bad raw input to preprocessing; the message names the file and line."""


class CheckpointError(AscendSpeedError, RuntimeError):
    """A checkpoint that cannot be read, written or loaded into this run; names file and field."""


class ConvertError(CheckpointError):
    """Input that cannot be converted; the message names the file, tensor or number."""


class ReshardError(CheckpointError):
    """A checkpoint that cannot be resharded as asked; the message names the file or number."""


class MegatronDeepSpeedError(CheckpointError):
    """An unreadable or inconsistent Megatron-DeepSpeed checkpoint; names the file and field."""


class TrainingError(AscendSpeedError, RuntimeError):
    """A run that cannot go on (non-finite loss or gradients, a dead peer); names the iteration."""


class JobLockError(AscendSpeedError, RuntimeError):
    """A checkpoint directory that another live job holds; names the holder."""


class HeartbeatError(AscendSpeedError, ValueError):
    """A heartbeat or relaunch record (tools/pulse.py) that cannot be read; names the file."""


class RunLogError(AscendSpeedError, ValueError):
    """A training log or TensorBoard directory (tools/compare_loss.py) that cannot be read;
    names the file and line or record."""


class PromptError(AscendSpeedError, ValueError):
    """A prompt that cannot be generated from (empty, or too long for the context)."""


class RequestError(AscendSpeedError, ValueError):
    """A request the generation server refuses (HTTP 400), with a message naming the field."""


class DownloadError(AscendSpeedError, RuntimeError):
    """A package index that could not provide the sample corpus (no network, no PyPI)."""


def error_line(error: BaseException) -> str:
    """`error: MESSAGE` on one line, as every entry point prints a user-facing error."""
    return "error: " + " ".join(str(error).split())
