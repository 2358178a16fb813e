"""StateBackend: the factory of keyed backends (Flink's StateBackend interface)."""
from statecore.checkpoint.storage import CheckpointStorage, JobManagerCheckpointStorage


class StateBackend:
    """Base of the working-state backends.

    A backend is a factory: ``create_keyed_state_backend(...)`` makes the
    per-operator keyed backend that holds state.  ``checkpoint_storage`` says
    where checkpoints go (default: ``JobManagerCheckpointStorage()``).
    """

    def __init__(self, checkpoint_storage=None):
        if checkpoint_storage is None:
            checkpoint_storage = JobManagerCheckpointStorage()
        if not isinstance(checkpoint_storage, CheckpointStorage):
            raise TypeError(f"checkpoint_storage must be a CheckpointStorage, got {type(checkpoint_storage).__name__}")
        self.checkpoint_storage = checkpoint_storage

    def create_keyed_state_backend(self, max_parallelism=128, key_group_range=None, key_serializer=None, clock=None,
                                   job_id="job", operator_id="operator"):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(checkpoint_storage={self.checkpoint_storage!r})"
