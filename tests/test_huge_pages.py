"""Weights and KV pools in huge-page arenas on the CPU: the same values, one mapping advised for
huge pages (where the kernel offers them), the same logits as without, and the fallbacks."""
import pytest
import torch

from lisa_rt import huge_pages
from lisa_rt.model import Model
from tests.fixtures import tiny_model_dir

offered = pytest.mark.skipif(not huge_pages.huge_pages_offered(),
                             reason="this kernel offers no transparent huge pages to madvise")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds address."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def tensors():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(7, 5, generator=gen), torch.randn(3, generator=gen).bfloat16(),
            torch.randint(0, 9, (4, 4), generator=gen), torch.zeros(0, 3), torch.randn((), generator=gen)]


@offered
def test_pack_copies_into_one_advised_mapping():
    originals = tensors()
    packed = huge_pages.pack(originals)
    assert [p.dtype for p in packed] == [o.dtype for o in originals]
    assert all(torch.equal(p, o) and p.is_contiguous() for p, o in zip(packed, originals))
    storage = packed[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p in packed)
    assert all(p.data_ptr() % huge_pages.ALIGNMENT == 0 for p in packed)
    assert packed[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    assert "hg" in vm_flags(packed[0].data_ptr())  # madvise(MADV_HUGEPAGE) took
    # Writable, and independent of the originals.
    packed[0].zero_()
    assert originals[0].abs().sum() > 0


def test_pack_leaves_tensors_alone_where_it_cannot_or_should_not(monkeypatch):
    originals = tensors()
    monkeypatch.setenv("LISA_RT_HUGE_PAGES", "0")
    assert huge_pages.pack(originals) is originals
    assert huge_pages.zeros_packed([((2, 2), torch.float32)]) is None
    monkeypatch.delenv("LISA_RT_HUGE_PAGES")
    meta = [torch.empty(3, device="meta")]
    assert huge_pages.pack(meta) is meta
    assert huge_pages.pack([]) == []
    monkeypatch.setattr(huge_pages, "THP_SETTING", huge_pages.Path("/nonexistent/thp"))
    assert not huge_pages.huge_pages_offered()


@offered
def test_copies_that_would_take_half_the_available_memory_are_not_made(monkeypatch):
    originals = tensors()
    monkeypatch.setattr(huge_pages, "available_memory", lambda: 100)
    assert huge_pages.pack(originals) is originals
    monkeypatch.setattr(huge_pages, "available_memory", lambda: None)  # unknown: not made either
    assert huge_pages.pack(originals) is originals
    monkeypatch.setattr(huge_pages, "available_memory", lambda: 1 << 40)
    assert huge_pages.pack(originals) is not originals


@offered
def test_no_address_space_for_an_arena_falls_back(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    assert huge_pages.huge_page_arena(1 << 20) is None
    originals = tensors()
    assert huge_pages.pack(originals) is originals


@offered
def test_zeros_packed_shapes_dtypes_and_zeros():
    specs = [((4, 16, 2, 8), torch.bfloat16), ((4, 16, 2, 4), torch.float32), ((1,), torch.float16)]
    pools = huge_pages.zeros_packed(specs)
    assert [(tuple(p.shape), p.dtype) for p in pools] == specs
    assert all(p.count_nonzero() == 0 and p.is_contiguous() for p in pools)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=4)


def load(model_dir, monkeypatch, huge: bool) -> Model:
    import lisa_rt

    monkeypatch.setenv("LISA_RT_HUGE_PAGES", "1" if huge else "0")
    return lisa_rt.load_model(model_dir, device="cpu", dtype="float32")


@offered
def test_model_weights_and_cache_in_huge_pages_give_the_same_logits(model_dir, monkeypatch):
    plain, packed = load(model_dir, monkeypatch, huge=False), load(model_dir, monkeypatch, huge=True)
    weights = [packed.embed, packed.norm] + [getattr(layer, name) for layer in packed.layers
                                             for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
    storage = weights[0].untyped_storage().data_ptr()
    assert all(w.untyped_storage().data_ptr() == storage for w in weights)
    assert "hg" in vm_flags(weights[0].data_ptr())
    assert packed.lm_head is packed.embed or packed.lm_head.untyped_storage().data_ptr() == storage
    # Without huge pages every weight keeps an allocation of its own. (Not checked through
    # VmFlags: where glibc's malloc is tuned to advise its heap for huge pages, as on some
    # machines, torch's own allocations carry the flag too.)
    plain_weights = [plain.embed, plain.norm] + [getattr(layer, name) for layer in plain.layers
                                                 for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
    plain_storages = {w.untyped_storage().data_ptr() for w in plain_weights}
    assert len(plain_storages) == len(plain_weights) and storage not in plain_storages
    cache = packed.new_cache([40])
    assert "hg" in vm_flags(cache.key_pools[0].data_ptr())
    assert all(pool.count_nonzero() == 0 for pool in cache.key_pools + cache.value_pools)
    ids = list(range(3, 40))
    assert torch.equal(plain.logits(ids), packed.logits(ids))
