"""Child process of the bank crash test: train, checkpoint, train, then die (SIGKILL) mid-way through
the next bank checkpoint. argv: OUT_DIR."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bank_harness import Net, configs, make_optimizers, train  # noqa: E402
from memory import bank_io  # noqa: E402
from memory.model import MemoryLM  # noqa: E402
from memory.offload import OffloadedBank  # noqa: E402
from model.model import Anchor  # noqa: E402
import torch  # noqa: E402


def setup(live_dir, storage="mmap"):
    mc, mem = configs()
    torch.manual_seed(0)
    bank = OffloadedBank(mem, mc, storage=storage, path=live_dir, seed=5, shard_bytes=8 << 10)
    lm = MemoryLM(Anchor(mc), mem, bank=bank)
    return mem, lm, bank


def save(bank, ckpt_root, step):
    """What the training loop does: write step-N.tmp/bank, then rename the step dir."""
    tmp = os.path.join(ckpt_root, f"step-{step:07d}.tmp")
    bank.save_checkpoint(os.path.join(tmp, "bank"))
    os.replace(tmp, tmp[:-4])


if __name__ == "__main__":
    out = sys.argv[1]
    mem, lm, bank = setup(os.path.join(out, "live"))
    dense, dense_opt, bank_opt = make_optimizers(lm, bank)
    train(Net(lm), dense, dense_opt, bank_opt, steps=3, B=4, mem_cfg=mem, accumulate=1)
    save(bank, os.path.join(out, "ckpt"), 3)
    train(Net(lm), dense, dense_opt, bank_opt, steps=2, B=4, mem_cfg=mem, accumulate=1, first_step=3)

    real, n = bank_io.write_safetensors, [0]

    def dying_write(path, arrays, metadata=None):  # the second shard write never finishes
        n[0] += 1
        if n[0] == 2:
            with open(path + ".tmp", "wb") as f:
                f.write(b"\0" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, arrays, metadata)

    bank_io.write_safetensors = dying_write
    save(bank, os.path.join(out, "ckpt"), 5)
    print("not killed?!")
