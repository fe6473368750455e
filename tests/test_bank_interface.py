"""The declared bank interface (memory.bank.Bank): what the trainer, checkpointing and evaluation call on
any bank, with neutral defaults on a resident bank and real implementations on an offloaded one."""
import pytest
import torch

from _bank_harness import configs
from memory.bank import Bank, ResidentBank
from memory.model import MemoryLM
from memory.offload import OffloadedBank
from memory.storage import make_bank
from model.model import Anchor

# The operations train/ calls on a bank (the loop, the checkpointer, evaluation): declared on Bank.
OPERATIONS = ("gather", "generic_block", "fetch", "row_grads", "clear_grads", "count_tokens", "prefetch",
              "save_checkpoint", "load_checkpoint", "has_checkpoint", "close")


def test_bank_is_abstract_and_declares_every_operation():
    mc, mem = configs()
    with pytest.raises(TypeError, match="abstract"):
        Bank(mem, mc)
    for name in OPERATIONS:
        assert callable(getattr(Bank, name)), name
    assert Bank.sparse is False and ResidentBank.sparse is False and OffloadedBank.sparse is True


def test_resident_defaults_are_neutral(tmp_path):
    mc, mem = configs()
    torch.manual_seed(0)
    lm = MemoryLM(Anchor(mc), mem)
    bank = lm.bank
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    paths = torch.tensor([[0, 1, 2], [3, 3, 3]])
    bank.prefetch(paths)
    lm(torch.zeros(2, 4, dtype=torch.long), mem_path=paths).sum().backward()
    bank.count_tokens(4)
    assert bank.row_grads() == []
    bank.clear_grads()
    assert bank.save_checkpoint(str(tmp_path / "bank")) is None
    assert not (tmp_path / "bank").exists()  # nothing to write: the weights are in model.safetensors
    assert bank.has_checkpoint(str(tmp_path)) is False
    bank.load_checkpoint(str(tmp_path / "bank"))
    bank.close()
    assert all(torch.equal(before[k], v) for k, v in bank.state_dict().items())


def test_offloaded_checkpoint_round_trip_through_the_interface(tmp_path):
    mc, mem = configs()
    torch.manual_seed(0)
    bank = OffloadedBank(mem, mc, storage="host", seed=1)
    lm = MemoryLM(Anchor(mc), mem, bank=bank)
    paths = torch.tensor([[0, 1, 2], [3, 3, 3]])
    lm(torch.zeros(2, 4, dtype=torch.long), mem_path=paths).sum().backward()
    grads = bank.row_grads()
    assert [key for key, *_ in grads] == ["level1", "level2", "level3"]
    assert [len(rows) for _, _, rows, _ in grads] == [2, 2, 2]
    bank.clear_grads()
    assert bank.row_grads() == []
    step_dir = tmp_path / "step-1"
    assert not bank.has_checkpoint(str(step_dir))
    counts = bank.save_checkpoint(Bank.checkpoint_dir(str(step_dir)))
    assert set(counts) == {"written", "linked", "skipped"}
    assert bank.has_checkpoint(str(step_dir))
    bank.close()


def test_make_bank_follows_storage(tmp_path):
    mc, mem = configs()
    assert type(make_bank(mem, mc)) is ResidentBank
    for storage in ("host", "mmap"):
        mem.storage = storage
        bank = make_bank(mem, mc, live_dir=str(tmp_path / storage) if storage == "mmap" else None)
        assert isinstance(bank, OffloadedBank) and bank.storage == storage and bank.sparse
        bank.close()
