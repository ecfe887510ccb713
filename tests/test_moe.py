"""The MoE layer against the paper's equations and its own reference implementation."""
import pytest
import torch
import torch.nn.functional as F

from timm_mlit.layers import (
    EXPERT_SHARING,
    MOE_IMPLS,
    MoE,
    NoisyTopKGate,
    cv_squared,
    moe_balance_loss,
    prob_in_top_k,
    softmax_k,
    top_k_thresholds,
)
from timm_mlit.layers.ops import NoisyTopKFunction, PairedExpertMix, SortedExpertMix, sorted_mix
from timm_mlit.layers.ops.sorted_mix import pad_blocks, padded_size

# the matrix H of eq. 4 and eq. 7
H_PAPER = torch.tensor([
    [4.4742, -5.6365, 6.8226, 0.9960],
    [3.5298, 2.3049, 1.2113, -1.3946],
    [-2.2414, 0.3925, 1.6676, -1.9253],
])


def test_softmax_k_reproduces_eq4():
    expected = torch.tensor([
        [0.0872, 0.0000, 0.9128, 0.0000],
        [0.7729, 0.2271, 0.0000, 0.0000],
        [0.0000, 0.2184, 0.7816, 0.0000],
    ])
    out = softmax_k(H_PAPER, k=2)
    assert torch.allclose(out.round(decimals=4), expected, atol=1e-6)


def test_top_k_thresholds_reproduces_eq9():
    expected = torch.tensor([
        [0.9960, 4.4742, 0.9960, 4.4742],
        [1.2113, 1.2113, 2.3049, 2.3049],
        [0.3925, -1.9253, -1.9253, 0.3925],
    ])
    assert torch.equal(top_k_thresholds(H_PAPER, k=2), expected)


def test_top_k_thresholds_needs_a_k_plus_first_expert():
    with pytest.raises(ValueError, match='k < number of experts'):
        top_k_thresholds(torch.randn(3, 2), k=2)


def test_prob_in_top_k_matches_monte_carlo():
    """P(x)_c is the chance that expert c lands in its row's top k when only its own noise is drawn anew."""
    torch.manual_seed(0)
    n, t, k = 4, 5, 2
    clean = torch.randn(n, t)
    std = F.softplus(torch.randn(n, t))
    noisy = clean + torch.randn(n, t) * std
    p = prob_in_top_k(clean, noisy, std, k)

    draws = 20000
    mc = torch.zeros(n, t)
    for c in range(t):
        resampled = noisy.unsqueeze(0).repeat(draws, 1, 1)  # [D, n, t]
        resampled[:, :, c] = clean[:, c] + torch.randn(draws, n) * std[:, c]
        kth = resampled.topk(k, dim=-1).values[..., -1]
        mc[:, c] = (resampled[:, :, c] >= kth).float().mean(0)
    assert torch.allclose(p, mc, atol=0.02)


def test_cv_squared():
    x = torch.tensor([1., 2., 3., 6.])
    assert torch.allclose(cv_squared(x), x.var() / x.mean() ** 2)
    assert cv_squared(torch.full((5,), 3.)) == 0
    assert cv_squared(torch.tensor([4.])) == 0


def test_balance_loss_is_zero_when_balanced_and_grows_with_imbalance():
    even = torch.full((4,), 10.)
    assert moe_balance_loss(even, even) == 0
    skewed = torch.tensor([37., 1., 1., 1.])
    assert moe_balance_loss(skewed, even) > moe_balance_loss(torch.tensor([12., 10., 9., 9.]), even) > 0


def test_gate_adds_noise_only_in_training():
    gate = NoisyTopKGate(16, 4, 2)
    x = torch.randn(50, 16)
    gate.eval()
    g1, g2 = gate(x)[0], gate(x)[0]
    assert torch.equal(g1, g2)
    assert torch.allclose(g1, softmax_k(x @ gate.weight[:4].t(), 2))
    gate.train()
    assert not torch.equal(gate(x)[0], gate(x)[0])


def test_gate_load_is_eq5_and_its_gates_are_eq2_of_the_noisy_logits():
    torch.manual_seed(0)
    gate = NoisyTopKGate(16, 5, 2).train()
    x = torch.randn(40, 16)
    torch.manual_seed(7)
    gates, _, _, load = gate(x)
    clean, raw = (x @ gate.weight.t()).split(5, dim=-1)
    std = F.softplus(raw)
    torch.manual_seed(7)
    noisy = clean + torch.randn_like(clean) * std  # the same draw as the gate's
    assert torch.allclose(load, prob_in_top_k(clean, noisy, std, 2).sum(0), atol=1e-5)
    assert torch.allclose(gates, softmax_k(noisy, 2), atol=1e-6)


def test_gate_outputs_k_weights_summing_to_one():
    gates, top_idx, importance, load = NoisyTopKGate(16, 5, 2).train()(torch.randn(30, 16))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(30))
    assert torch.equal(gates.gather(1, top_idx) > 0, torch.ones(30, 2, dtype=torch.bool))
    assert torch.allclose(importance, gates.sum(0))
    assert load.shape == (5,) and (load > 0).all()


def _run(layer: MoE, x: torch.Tensor, seed: int):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # same gate noise for every implementation
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.parametrize('shared', EXPERT_SHARING)
@pytest.mark.parametrize('impl', ['dense', 'sparse', 'auto'])
@pytest.mark.parametrize('training', [True, False])
def test_fast_paths_equal_the_loop_reference(shared, impl, training):
    torch.manual_seed(0)
    ref = MoE(16, 12, 4, 2, expert_shared=shared, drop_rate=0., impl='loop')
    fast = MoE(16, 12, 4, 2, expert_shared=shared, drop_rate=0., impl=impl)
    fast.load_state_dict(ref.state_dict())
    ref.train(training)
    fast.train(training)
    _assert_same_outputs_and_gradients(ref, fast, torch.randn(3, 11, 16), seed=1)


def _assert_same_outputs_and_gradients(ref: MoE, fast: MoE, x: torch.Tensor, seed: int, grad_atol: float = 1e-5):
    y0, gx0, g0 = _run(ref, x, seed)
    y1, gx1, g1 = _run(fast, x, seed)
    assert torch.allclose(y0, y1, atol=1e-5)
    assert torch.allclose(gx0, gx1, atol=1e-5)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=grad_atol), name


def test_loop_reference_is_the_literal_sum_of_experts():
    """y = Σ_i G_i E_i(x) with E_i computed for every token (eq. 1, 13), no sharing tricks."""
    torch.manual_seed(0)
    layer = MoE(16, 12, 4, 2, drop_rate=0., impl='loop').eval()
    x = torch.randn(20, 16)
    gates = layer.gate(x)[0]
    expected = sum(gates[:, i:i + 1] * layer.experts.forward_expert(x, i) for i in range(4))
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_shared_matrices_are_shared():
    layer = MoE(16, 12, 4, 2)
    names = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert names['experts.w.weight'] == (4, 12, 16)  # one W per expert
    assert names['experts.v.weight'] == (12, 16)  # one V for the layer
    assert names['experts.w2.weight'] == (16, 12)


def test_balance_loss_reaches_gate_through_a_loop_that_only_backprops_its_own_loss():
    torch.manual_seed(0)
    layer = MoE(16, 12, 4, 2, drop_rate=0.).train()
    x = torch.randn(64, 16)
    torch.manual_seed(3)
    y = layer(x)
    # a criterion that does not depend on the gate at all: the gate gradient can only come from the hook
    (y * 0).sum().backward()
    got = layer.gate.weight.grad.clone()
    layer.zero_grad()
    torch.manual_seed(3)
    layer(x)
    expected = torch.autograd.grad(layer.last_loss, layer.gate.weight)[0]
    assert got.abs().sum() > 0
    assert torch.allclose(got, expected, atol=1e-7)


def test_loss_weight_zero_turns_the_hook_off_but_keeps_the_loss():
    layer = MoE(16, 12, 4, 2, drop_rate=0., loss_weight=0.).train()
    (layer(torch.randn(64, 16)) * 0).sum().backward()
    assert layer.gate.weight.grad is None or layer.gate.weight.grad.abs().sum() == 0
    assert layer.last_loss is not None and layer.last_loss > 0


def test_eval_computes_no_balance_loss_and_is_deterministic():
    layer = MoE(16, 12, 4, 2).eval()
    x = torch.randn(10, 16)
    assert torch.equal(layer(x), layer(x))
    assert layer.last_loss is None


@pytest.mark.parametrize('kwargs, match', [
    (dict(top_k=5), r'top_k=5 is not between 1 and the number of experts \(4\)'),
    (dict(impl='fastest'), 'unknown moe_impl'),
    (dict(expert_shared=('w', 'v', 'w2')), 'expert_shared'),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    args = dict(dim=16, hidden_dim=12, num_experts=4, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoE(**args)


@pytest.mark.parametrize('experts', [3, 5, 8])
@pytest.mark.parametrize('mode', ['train', 'eval', 'no_grad'])
def test_auto_equals_every_impl_at_every_expert_count(experts, mode):
    """Whatever 'auto' picks for a layer, device and mode, it computes what every implementation computes."""
    torch.manual_seed(0)
    layers = {impl: MoE(16, 12, experts, 2, drop_rate=0., impl=impl) for impl in MOE_IMPLS}
    for layer in layers.values():
        layer.load_state_dict(layers['loop'].state_dict())
        layer.train(mode == 'train')
    x = torch.randn(3, 11, 16)
    outs = {}
    for impl, layer in layers.items():
        torch.manual_seed(1)
        with torch.no_grad() if mode == 'no_grad' else torch.enable_grad():
            outs[impl] = layer(x)
    for impl in MOE_IMPLS:
        assert torch.allclose(outs[impl], outs['loop'], atol=1e-5), impl


def test_auto_runs_on_a_device_where_the_sparse_path_cannot():
    """The sparse path reads token counts back to the host: off the CPU (here 'meta', which has no data) 'auto'
    must take the fixed-shape path, in training and in inference."""
    layer = MoE(16, 12, 8, 2).to('meta')
    assert layer.train()(torch.randn(3, 11, 16, device='meta')).shape == (3, 11, 16)
    with torch.no_grad():
        assert layer.eval()(torch.randn(3, 11, 16, device='meta')).shape == (3, 11, 16)


@pytest.mark.parametrize('t, k', [(4, 2), (5, 2), (3, 1), (6, 3)])
@pytest.mark.parametrize('uses', ['gates', 'load', 'all'])
def test_gate_function_matches_autograd_through_the_equations(t, k, uses):
    """The training gate's hand-written backward (`NoisyTopKFunction`) against autograd through eq. 2-6 written
    with the pure functions (`forward_reference`), same noise, float64: values and gradients of x and W."""
    torch.manual_seed(0)
    gate = NoisyTopKGate(16, t, k).train().double()
    x = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w_gates = torch.randn(300, t, dtype=torch.float64)
    w_imp, w_load = torch.randn(t, dtype=torch.float64), torch.randn(t, dtype=torch.float64)
    results = []
    for route in (gate.forward_reference, gate.forward):
        torch.manual_seed(5)
        gates, top_idx, importance, load = route(x)
        loss = {'gates': (gates * w_gates).sum(), 'load': (load * w_load).sum(),
                'all': (gates * w_gates).sum() + (importance * w_imp).sum() + (load * w_load).sum()}[uses]
        results.append((gates, top_idx, importance, load) + torch.autograd.grad(loss, [x, gate.weight]))
    for name, ref, got in zip(['gates', 'top_idx', 'importance', 'load', 'dx', 'dW'], *results):
        assert torch.allclose(ref, got, rtol=1e-10, atol=1e-12), name


def test_gate_function_passes_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(20, 10, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(20, 5, dtype=torch.float64)
    weights = [torch.randn(20, 5, dtype=torch.float64)] + [torch.randn(5, dtype=torch.float64) for _ in range(2)]

    def f(z):
        gates, _, importance, load = NoisyTopKFunction.apply(z, eps, 2)
        return (gates * weights[0]).sum() + (importance * weights[1]).sum() + (load * weights[2]).sum()
    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize('mix', [SortedExpertMix, PairedExpertMix])
@pytest.mark.parametrize('silu', [True, False])
def test_expert_mix_functions_pass_gradcheck_with_an_idle_expert(mix, silu):
    """The sparse path's Functions, float64, with expert 3 of 4 chosen by no token (its weight gradient is zero)."""
    torch.manual_seed(0)
    n, k, t, m, d = 30, 2, 4, 6, 5
    top_idx = torch.stack([torch.randint(0, 3, (n,)), torch.full((n,), 0)], 1)
    top_idx[:, 1] = (top_idx[:, 0] + 1) % 3  # two distinct experts among 0..2 per token
    args = [torch.randn(n, m), torch.rand(n, k), top_idx, torch.randn(t, d, m), torch.randn(t, d), torch.randn(n, d)]
    args = [a.double().requires_grad_() if a.is_floating_point() else a for a in args]

    def f(x, p, weight, bias, u):
        return mix.apply(x, p, top_idx, weight, bias, u, silu)
    x, p, _, weight, bias, u = args
    assert torch.autograd.gradcheck(f, (x, p, weight, bias, u))
    f(x, p, weight, bias, u).sum().backward()
    assert weight.grad[3].abs().sum() == 0 and weight.grad[:3].abs().sum() > 0


def test_pad_blocks_pads_to_the_granule_or_a_small_block_to_a_power_of_two():
    order = torch.randperm(20)
    src, inverse, pads, blocks = pad_blocks(order, [3, 0, 9, 8], granule=8)
    assert blocks == [(0, 4), (4, 0), (4, 16), (20, 8)]
    rows = list(range(0, 3)) + list(range(4, 13)) + list(range(20, 28))  # each row's padded position, in order
    assert torch.equal(inverse[order], torch.tensor(rows)) and torch.equal(src[rows], order)
    assert pads.tolist() == [3] + list(range(13, 20)) and src[pads].eq(0).all()
    assert [padded_size(c, 128) for c in (0, 1, 3, 100, 128, 129, 300)] == [0, 1, 4, 128, 128, 256, 384]


@pytest.mark.parametrize('mix', [SortedExpertMix, PairedExpertMix])
def test_sparse_mix_pads_its_blocks_and_padding_changes_nothing(mix, monkeypatch):
    """The routing changes the blocks' sizes at every step; padded (ROW_GRANULE's comment in sorted_mix), every
    matmul the sparse path runs has a row count from a short recurring set, and outputs and gradients equal those of
    unpadded blocks, also where a pad row would read a token with non-finite values."""
    torch.manual_seed(0)
    n, k, t, m, d = 300, 2, 4, 6, 5
    top_idx = torch.randn(n, t).topk(k, 1).indices
    base = [torch.randn(n, m), torch.rand(n, k), torch.randn(t, d, m), torch.randn(t, d), torch.randn(n, d)]
    base[0][0, 0] = float('inf')  # token 0, the row a pad reads, is not finite (an overflow upstream)
    rows = []
    real_addmm = torch.addmm

    def addmm(bias, a, b, **kw):
        rows.append(a.shape[0])
        return real_addmm(bias, a, b, **kw)

    results = {}
    for granule in (1, 24):
        monkeypatch.setattr(sorted_mix, 'ROW_GRANULE', granule)
        monkeypatch.setattr(torch, 'addmm', addmm)
        rows.clear()
        x, p, weight, bias, u = (a.clone().requires_grad_() for a in base)
        out = mix.apply(x, p, top_idx, weight, bias, u, True)
        monkeypatch.setattr(torch, 'addmm', real_addmm)
        out.backward(torch.ones_like(out))
        results[granule] = [out] + [a.grad for a in (x, p, weight, bias, u)]
        real_rows = n * k if mix is SortedExpertMix else n
        if granule == 1:
            assert sum(rows) == real_rows
        else:
            assert sum(rows) > real_rows and all(r % 24 == 0 or (r < 24 and r & (r - 1) == 0) for r in rows)
    for padded, plain in zip(results[24], results[1]):
        torch.testing.assert_close(padded, plain, equal_nan=True)
    # experts that token 0 did not choose get finite gradients: no pad row carried its overflow
    unchosen = sorted(set(range(t)) - set(top_idx[0].tolist()))
    assert torch.isfinite(results[24][3][unchosen]).all()


@pytest.mark.parametrize('impl', ['dense', 'sparse'])
def test_fast_paths_equal_the_loop_reference_at_mlit_shapes(impl):
    """mlit_xxs's last layer shape (108 -> 27 hidden, 5 experts): the fused projection is zero-padded to a width of
    a multiple of 16 there; outputs and gradients still equal the reference."""
    torch.manual_seed(0)
    ref = MoE(108, 27, 5, 2, drop_rate=0., impl='loop').train()
    fast = MoE(108, 27, 5, 2, drop_rate=0., impl=impl).train()
    fast.load_state_dict(ref.state_dict())
    _assert_same_outputs_and_gradients(ref, fast, torch.randn(4, 145, 108), seed=3, grad_atol=1e-4)


@pytest.mark.parametrize('shared', EXPERT_SHARING)
@pytest.mark.parametrize('input_dtype', [torch.float32, torch.bfloat16])
def test_every_impl_trains_under_bfloat16_autocast_and_they_agree(shared, input_dtype):
    """timm's train.py --amp --amp-dtype bfloat16 (our recipes): projections run in bf16, the MoE's input arrives in
    fp32 from a LayerNorm (or in bf16 from elsewhere); every path must mix the dtypes and land close to the others.
    (bf16 rounds the fused and the separate gate matmuls differently, so a token whose top two logits nearly tie
    may route differently.)"""
    torch.manual_seed(0)
    layers = {impl: MoE(32, 24, 4, 2, expert_shared=shared, drop_rate=0., impl=impl).train()
              for impl in ('loop', 'dense', 'sparse')}
    for layer in layers.values():
        layer.load_state_dict(layers['loop'].state_dict())
    x = torch.randn(200, 32).to(input_dtype)
    out = {}
    for impl, layer in layers.items():
        torch.manual_seed(1)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        private = {'w': layer.experts.w, 'v': layer.experts.v, 'w2': layer.experts.w2}[layer.experts.private]
        out[impl] = (y.float(), private.weight.grad)
    y_ref, grad_ref = out['loop']
    for impl in ('dense', 'sparse'):
        y, grad = out[impl]
        same_tokens = torch.isclose(y, y_ref, atol=0.02, rtol=0.05).all(-1).float().mean()
        assert same_tokens > 0.95, (impl, same_tokens)
        assert (grad - grad_ref).norm() < 0.1 * grad_ref.norm(), impl


@pytest.mark.parametrize('shared', EXPERT_SHARING)
@pytest.mark.parametrize('impl', ['dense', 'sparse'])
def test_inference_paths_equal_the_loop_reference(shared, impl):
    """Without gradients the fast paths take other branches ('dense' mixes in place): same outputs as the loop."""
    torch.manual_seed(0)
    ref = MoE(16, 12, 4, 2, expert_shared=shared, impl='loop').eval()
    fast = MoE(16, 12, 4, 2, expert_shared=shared, impl=impl).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        assert torch.allclose(fast(x), ref(x), atol=1e-5)


@pytest.mark.parametrize('shared', EXPERT_SHARING)
def test_training_step_compiles_as_one_graph(shared):
    """torch.compile(fullgraph=True) of a training step, gate noise included ('auto' runs 'dense' when compiling):
    the gate Function's backward must be traceable."""
    torch.manual_seed(0)
    layer = MoE(16, 12, 4, 2, expert_shared=shared, drop_rate=0.).train()
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    x = torch.randn(40, 16, requires_grad=True)
    compiled(x).square().sum().backward()
    assert x.grad.isfinite().all() and layer.gate.weight.grad.abs().sum() > 0


def test_scripted_layer_runs_in_train_mode():
    """TorchScript cannot run the autograd Functions: a scripted layer in train mode routes without noise."""
    layer = torch.jit.script(MoE(16, 12, 4, 2).eval()).train()
    assert layer(torch.randn(10, 16)).shape == (10, 16)


def test_second_order_gradients_are_refused_clearly():
    layer = MoE(16, 12, 4, 2, drop_rate=0., impl='sparse').train()
    x = torch.randn(20, 16, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        gx.sum().backward()


@pytest.mark.parametrize('experts, top_k', [(8, 2), (5, 3), (4, 1)])
def test_sorted_dispatch_equals_the_loop_reference(experts, top_k):
    """'sparse' groups tokens by expert pair for top-2 with up to 5 experts; the other shapes take the sorted
    (token, expert) dispatch, which must equal the reference too."""
    torch.manual_seed(0)
    ref = MoE(16, 12, experts, top_k, drop_rate=0., impl='loop').train()
    fast = MoE(16, 12, experts, top_k, drop_rate=0., impl='sparse').train()
    fast.load_state_dict(ref.state_dict())
    _assert_same_outputs_and_gradients(ref, fast, torch.randn(3, 11, 16), seed=2)
