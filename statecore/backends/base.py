"""StateBackend: the factory of keyed backends (Flink's StateBackend interface)."""
from statecore.checkpoint.storage import CheckpointStorage, JobManagerCheckpointStorage


class StateBackend:
    """Base of the working-state backends.

    A backend is a factory: ``create_keyed_state_backend(...)`` makes the
    per-operator keyed backend that holds state, ``restore_keyed_state_backend``
    makes one from checkpoints.  ``checkpoint_storage`` says where checkpoints
    go (default: ``JobManagerCheckpointStorage()``); ``num_retained`` how many
    completed checkpoints of each instance are kept (Flink's
    ``execution.checkpointing.num-retained``, default 1).
    """

    def __init__(self, checkpoint_storage=None, *, num_retained=1):
        if checkpoint_storage is None:
            checkpoint_storage = JobManagerCheckpointStorage()
        if not isinstance(checkpoint_storage, CheckpointStorage):
            raise TypeError(f"checkpoint_storage must be a CheckpointStorage, got {type(checkpoint_storage).__name__}")
        if isinstance(num_retained, bool) or not isinstance(num_retained, int) or num_retained < 1:
            raise ValueError(f"num_retained must be an int >= 1, got {num_retained!r}")
        self.checkpoint_storage = checkpoint_storage
        self.num_retained = num_retained

    #: max_parallelism used when none is passed (``pipeline.max-parallelism``).
    default_max_parallelism = 128

    def create_keyed_state_backend(self, max_parallelism=None, key_group_range=None, key_serializer=None, clock=None,
                                   job_id="job", operator_id="operator"):
        """A new, empty keyed backend owning ``key_group_range`` (default: all key groups).

        ``max_parallelism`` defaults to 128 (or ``pipeline.max-parallelism``);
        ``clock`` is a callable returning milliseconds (default: the wall clock);
        ``key_serializer`` defaults to ``Auto()``.
        """
        if max_parallelism is None:
            max_parallelism = self.default_max_parallelism
        kb = self._create_keyed(max_parallelism=max_parallelism, key_group_range=key_group_range,
                                key_serializer=key_serializer, clock=clock, job_id=job_id, operator_id=operator_id)
        kb.state_backend = self
        if getattr(self, "incremental", False):
            kb._enable_incremental()
        return kb

    def restore_keyed_state_backend(self, checkpoints, max_parallelism=None, key_group_range=None, key_serializer=None,
                                    clock=None, job_id="job", operator_id="operator"):
        """A keyed backend restored from ``checkpoints`` (CompletedCheckpoint objects or locations).

        Rescaling: pass the checkpoints of all old parallel instances and this
        instance's ``key_group_range``; exactly the owned key groups are loaded.
        Every file is verified before any state is loaded (CorruptCheckpointError).
        A canonical savepoint restores into every backend type.
        """
        from statecore.checkpoint.snapshot import restore
        return restore(self, checkpoints, max_parallelism=max_parallelism, key_group_range=key_group_range,
                       key_serializer=key_serializer, clock=clock, job_id=job_id, operator_id=operator_id)

    def create_operator_state_backend(self):
        """A new operator (non-keyed) state backend: list, union list and broadcast state."""
        from statecore.operator_state import OperatorStateBackend
        return OperatorStateBackend(self)

    def restore_operator_state_backend(self, checkpoints, parallelism, index):
        """Operator state of instance ``index`` of ``parallelism`` from the checkpoints of all old instances."""
        from statecore.operator_state import restore
        return restore(self, checkpoints, parallelism, index)

    def _create_keyed(self, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must implement _create_keyed")

    def __repr__(self):
        return f"{type(self).__name__}(checkpoint_storage={self.checkpoint_storage!r})"
