"""state_backend_from_config: Flink-style keys, aliases, sizes, errors."""
import pytest

import statecore as sc
from statecore.backends.config import parse_size


def test_hashmap_with_filesystem_storage(tmp_path):
    b = sc.state_backend_from_config({"state.backend.type": "hashmap", "execution.checkpointing.dir": str(tmp_path),
                                      "execution.checkpointing.num-retained": "3", "pipeline.max-parallelism": "256",
                                      "taskmanager.memory.process.size": "1gb"})  # non-state keys are ignored
    assert isinstance(b, sc.HashMapStateBackend)
    assert isinstance(b.checkpoint_storage, sc.FileSystemCheckpointStorage) and b.checkpoint_storage.uri == str(tmp_path)
    assert b.num_retained == 3
    with b.create_keyed_state_backend() as kb:
        assert kb.max_parallelism == 256


def test_lmdb_options_and_deprecated_aliases(tmp_path):
    b = sc.state_backend_from_config({"state.backend": "rocksdb", "state.checkpoints.dir": str(tmp_path),
                                      "state.backend.incremental": "true",
                                      "state.backend.lmdb.write-buffer-size": "8mb",
                                      "state.backend.rocksdb.memory-budget": "64 MiB",
                                      "state.savepoints.dir": str(tmp_path / "sp")})
    assert type(b).__name__ == "LMDBStateBackend"
    assert b.write_buffer_size == 8 << 20 and b.memory_budget == 64 << 20
    assert b.savepoint_dir == str(tmp_path / "sp")


def test_default_is_hashmap_on_jobmanager():
    b = sc.state_backend_from_config({})
    assert isinstance(b, sc.HashMapStateBackend) and isinstance(b.checkpoint_storage, sc.JobManagerCheckpointStorage)


@pytest.mark.parametrize("bad", [{"state.backend.typo": "x"}, {"state.backend.lmdb.nonsense": 1},
                                 {"state.backend.type": "cassandra"},
                                 {"execution.checkpointing.storage": "filesystem"},
                                 {"execution.checkpointing.num-retained": "0"},
                                 {"state.backend.type": "lmdb", "state.backend.lmdb.write-buffer-size": "lots"}])
def test_bad_config_names_the_key(bad):
    with pytest.raises(ValueError) as err:
        sc.state_backend_from_config(bad)
    assert any(k.split(".")[-1] in str(err.value) for k in bad) or "state.backend" in str(err.value)


def test_parse_size():
    assert parse_size("64mb") == 64 << 20 and parse_size("1 GiB") == 1 << 30 and parse_size(512) == 512
    assert parse_size("10k") == 10240
    with pytest.raises(ValueError):
        parse_size("-1mb")
