"""A disk that fills up during a save: an ordinary error naming the folder and the room needed, and
nothing lost: the earlier checkpoints and the tracker stay, nothing partial is left, sync or async.
"""

from __future__ import annotations

import pytest
from checkpoint_faults import Stateful, tmpfs, train

from helpers import make_tiny_config
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.checkpoint.lock import LOCK_FILE, CheckpointSaveError
from megatron.bridge.training.checkpointing import estimate_checkpoint_bytes
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.optim import setup_optimizer
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.utils.errors import UserError


@pytest.fixture(scope="module")
def room_for_one(tmp_path_factory) -> int:
    """A tmpfs size with room for one checkpoint of the tiny run and its start-up estimate, not for two."""
    save = tmp_path_factory.mktemp("measure") / "ckpt"
    train(save, train__train_iters=2, checkpoint__save_interval=None)
    one = sum(p.stat().st_size for p in (save / "iter_0000002").iterdir())
    cfg = make_tiny_config()
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    model = cfg.model.provide()
    optimizer, _ = setup_optimizer(cfg.optimizer, cfg.scheduler, [model], train_iters=2)
    estimate = estimate_checkpoint_bytes(model, optimizer, save_optim=True)
    size = max(estimate + (64 << 10), one + one // 2)
    assert size < 2 * one, f"the estimate ({estimate}) is too far above a checkpoint's size ({one}) for this test"
    return size


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_is_a_readable_error_and_loses_nothing(tmp_path, room_for_one, async_save):
    with tmpfs(tmp_path / "disk", size=room_for_one) as mount:
        save = mount / "ckpt"
        with pytest.raises(BaseException) as caught:  # noqa: B017 - the type is asserted below
            pretrain(make_tiny_config(train__train_iters=4, checkpoint__save=str(save), checkpoint__save_interval=2,
                                      checkpoint__async_save=async_save), forward_step, [Stateful()])
        error = caught.value
        assert isinstance(error, CheckpointSaveError) and isinstance(error, UserError), repr(error)
        message = str(error)
        assert message.startswith(f"cannot save the checkpoint of iteration 4 into checkpoint.save={str(save)!r}: ")
        assert "no space left on the device (one checkpoint needs about" in message
        assert "Traceback" not in message and "\n" not in message
        # Nothing lost, nothing partial: the checkpoint of step 2 and its tracker, and no temporary folder.
        assert sorted(p.name for p in save.iterdir()) == ["iter_0000002", checkpoint_io.TRACKER_FILE]
        assert not (save / LOCK_FILE).exists()
        assert checkpoint_io.read_tracker(save) == 2
        # And it loads (read-only: the full disk has no room for another save).
        resumed = Stateful()
        pretrain(make_tiny_config(train__train_iters=2, checkpoint__load=str(save)), forward_step, [resumed])
        assert resumed.restored == [{"seen": 3, "best": float("inf")}]

