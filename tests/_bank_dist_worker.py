"""torchrun worker of the distributed bank test: cluster-affine training of anchor (DDP) + offloaded bank.
argv: OUT_DIR. Each rank trains only the rows of the subtrees it owns (top cluster c -> rank c % world)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from _bank_harness import Net, configs, make_optimizers, train  # noqa: E402
from memory.model import MemoryLM  # noqa: E402
from memory.offload import OffloadedBank  # noqa: E402
from memory.row_store import affine_rows  # noqa: E402
from model.model import Anchor  # noqa: E402

STEPS, B_GLOBAL = 10, 8


def run(rank: int, world: int, out: str | None = None):
    """Train STEPS steps on the global batch B_GLOBAL (this rank's affine share); returns (losses, lm, bank)."""
    mc, mem = configs()
    torch.manual_seed(0)
    bank = OffloadedBank(mem, mc, storage="host", seed=7, rank=rank, world_size=world)
    lm = MemoryLM(Anchor(mc), mem, bank=bank)
    net = Net(lm)
    if world > 1:
        net = DDP(net, find_unused_parameters=True)  # the generic block is unused on a rank without generic rows
    dense, dense_opt, bank_opt = make_optimizers(lm, bank, grad_divisor=world)
    select = (lambda p: affine_rows(p, rank, world)) if world > 1 else None
    # every global batch holds B_GLOBAL / world rows of each rank's subtrees (equal target counts per rank)
    losses = train(net, dense, dense_opt, bank_opt, steps=STEPS, B=B_GLOBAL, mem_cfg=mem,
                   tops=list(range(mem.k)), select=select)
    return losses, lm, bank


if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    losses, lm, bank = run(rank, world)
    loss = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(loss)  # equal target counts per rank: the mean of rank means is the global mean
    bank.save_checkpoint(os.path.join(out, "bank"))  # collective: each rank writes its own subtrees
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"resident_bytes": bank.resident_bytes(), "full_bytes": bank.full_bytes(),
                   "owned_tops": bank.owned_tops}, f)
    if rank == 0:
        torch.save({"losses": (loss / world).tolist(), "anchor": lm.anchor.state_dict(),
                    "generic": lm.bank.generic.detach()}, os.path.join(out, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()
