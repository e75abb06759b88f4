"""The precomputed table equals the mapper at every row; TI / XTI precompute to the same format."""
import pytest
import torch
from safetensors import safe_open

from neti_fast.errors import NetiError
from neti_fast.concepts.table import load_table, precompute


def test_table_equals_mapper_at_every_row(make_concept):
    """Bit-identical to the mapper evaluated the way precompute batches it (4000 rows at a time), and
    equal to float rounding to one 16000-row call: BLAS may sum in another order for another batch
    size (1-ulp differences seen with 2 threads), which no table user can tell apart."""
    c = make_concept("neti", dim=32, seed=1)
    table = precompute(c, truncations=[8, 64], progress=False)
    t = torch.arange(1000).repeat_interleave(16).float()
    l = torch.arange(16).repeat(1000).float()
    for trunc in (None, 8, 64):
        with torch.no_grad():
            chunks = [c.embeddings_at(t[i:i + 4000], l[i:i + 4000], trunc) for i in range(0, 16000, 4000)]
            tok_all, byp_all = c.embeddings_at(t, l, trunc)
        tok, byp = torch.cat([a for a, _ in chunks]), torch.cat([b for _, b in chunks])
        assert table.token[trunc].shape == (1000, 16, 32)
        torch.testing.assert_close(table.token[trunc], tok.view(1000, 16, 32), rtol=0, atol=0)
        torch.testing.assert_close(table.bypass[trunc], byp.view(1000, 16, 32), rtol=0, atol=0)
        torch.testing.assert_close(table.token[trunc], tok_all.view(1000, 16, 32), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(table.bypass[trunc], byp_all.view(1000, 16, 32), rtol=1e-5, atol=1e-6)
    # truncation changes the rows by far more than that tolerance
    assert (table.token[None] - table.token[8]).abs().max() > 1e-3


def test_file_format_and_lookup(tmp_path, make_concept):
    c = make_concept("neti", dim=32, seed=2)
    path = precompute(c, truncations=[16], progress=False).save(tmp_path / "t.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
        assert {"token", "bypass", "token.trunc16", "bypass.trunc16"} <= keys
        assert f.get_tensor("token").dtype == torch.float32
    assert md["neti_fast.format"] == "table" and md["method"] == "neti" and md["truncations"] == "16"
    table = load_table(path)
    ts = torch.tensor([999, 500, 21, 0])
    tok, byp = table.schedule_rows(ts, 16)
    want_tok, want_byp = c.embeddings_at(ts.repeat_interleave(16).float(), torch.arange(16).repeat(4).float(), 16)
    torch.testing.assert_close(tok, want_tok.view(4, 16, 32), rtol=0, atol=0)
    torch.testing.assert_close(byp, want_byp.view(4, 16, 32), rtol=0, atol=0)


def test_fractional_timesteps_evaluate_the_mapper(make_concept):
    c = make_concept("neti", dim=32, seed=3)
    table = precompute(c, progress=False)
    ts = torch.tensor([999.0, 612.37, 0.5])
    tok, _ = table.schedule_rows(ts)
    want, _ = c.embeddings_at(ts.repeat_interleave(16), torch.arange(16).repeat(3).float())
    torch.testing.assert_close(tok, want.view(3, 16, 32))
    # a truncation that was not precomputed is served exactly too
    tok8, _ = table.schedule_rows(torch.tensor([10]), 8)
    torch.testing.assert_close(tok8[0], c.embeddings_at(torch.full((16,), 10.0), torch.arange(16).float(), 8)[0])


@pytest.mark.parametrize("method", ["xti", "ti"])
def test_ti_xti_constant_rows(method, make_concept):
    c = make_concept(method, dim=32)
    table = precompute(c, progress=False)
    tok = table.token[None]
    assert tok.shape == (1000, 16, 32) and None not in table.bypass
    assert torch.equal(tok[0], tok[999])
    if method == "xti":
        torch.testing.assert_close(tok[123], c.embeds)
    else:
        assert torch.equal(tok[5, 0], tok[5, 15])
    with pytest.raises(NetiError, match="NeTI"):
        precompute(c, truncations=[8], progress=False)
