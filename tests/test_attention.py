"""Grouped-query attention equals multi-head attention with each K/V head shared by its group of query heads."""
import pytest
import torch
import torch.nn.functional as F

from timm_mlit.layers import GroupedQueryAttention


def reference_gqa(attn: GroupedQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """The textbook form: expand the G key/value heads to H, head h reading K/V head h // (H / G)."""
    B, N, C = x.shape
    H, G, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([C, G * hd, G * hd], dim=-1)
    q = q.reshape(B, N, H, hd).transpose(1, 2)
    k = k.reshape(B, N, G, hd).transpose(1, 2).repeat_interleave(H // G, dim=1)
    v = v.reshape(B, N, G, hd).transpose(1, 2).repeat_interleave(H // G, dim=1)
    a = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize('heads, kv_heads', [(6, 3), (8, 4), (4, 1), (4, 4)])
@pytest.mark.parametrize('fused', [True, False])
def test_grouped_query_attention_matches_the_reference(heads, kv_heads, fused):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(8 * heads, heads, kv_heads).eval()
    attn.fused_attn = fused
    x = torch.randn(2, 13, 8 * heads)
    assert torch.allclose(attn(x), reference_gqa(attn, x), atol=1e-5)


def test_gqa_has_fewer_kv_parameters_and_biases_everywhere():
    attn = GroupedQueryAttention(108, 6, 3)
    assert attn.qkv.weight.shape == (108 + 2 * 54, 108)
    assert attn.qkv.bias is not None and attn.proj.bias is not None


def test_bad_head_counts_name_the_problem():
    with pytest.raises(ValueError, match='divisible by num_kv_heads'):
        GroupedQueryAttention(108, 6, 4)
    with pytest.raises(ValueError, match='divisible by num_heads'):
        GroupedQueryAttention(100, 6, 3)


def test_attention_is_not_causal_and_sees_every_token():
    attn = GroupedQueryAttention(16, 2, 1).eval()
    x = torch.randn(1, 5, 16)
    y = attn(x)
    x2 = x.clone()
    x2[0, -1] += 1.0  # changing the last token changes the first token's output
    assert not torch.allclose(attn(x2)[0, 0], y[0, 0])
    assert F.mse_loss(y, attn(x)) == 0
