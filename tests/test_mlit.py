"""The mLiT models: architecture facts from the paper and the timm API around them."""
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_mlit  # noqa: F401  (registers the models)
from timm_mlit.layers import named_moe_layers
from timm_mlit.mlit import checkpoint_filter_fn, depthwise_hidden_dims, experts_per_layer

# Table 1 (encoder only) and Table 8 (with a 100-class head), in millions
PAPER_PARAMS = {
    'mlit_s': (2.36, 2.38),
    'mlit_xs': (1.21, 1.22),
    'mlit_xxs': (0.66, 0.67),
}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', PAPER_PARAMS)
def test_parameter_counts_within_2_percent_of_the_paper(name):
    encoder, with_head = PAPER_PARAMS[name]
    assert n_params(timm.create_model(name, num_classes=0)) / 1e6 == pytest.approx(encoder, rel=0.02)
    assert n_params(timm.create_model(name, num_classes=100)) / 1e6 == pytest.approx(with_head, rel=0.02)


def test_depthwise_scaling_eq15_and_expert_stages_of_mlit_xxs():
    # Fig. 4 of the paper: 9 layers, hidden 81 -> 27, experts 3 -> 5 at layers 3 and 6
    assert depthwise_hidden_dims(9, 81, 27) == [81, 74, 67, 60, 54, 47, 40, 33, 27]
    assert experts_per_layer(9, (3, 4, 5)) == [3, 3, 3, 4, 4, 4, 5, 5, 5]
    model = timm.create_model('mlit_xxs')
    assert [b.mlp.experts.hidden_dim for b in model.blocks] == [81, 74, 67, 60, 54, 47, 40, 33, 27]
    assert [b.mlp.gate.num_experts for b in model.blocks] == [3, 3, 3, 4, 4, 4, 5, 5, 5]


@pytest.mark.parametrize('name, first, last, depth', [('mlit_s', 144, 72, 15), ('mlit_xs', 96, 32, 12)])
def test_hidden_sizes_run_from_first_to_last(name, first, last, depth):
    model = timm.create_model(name)
    hidden = [b.mlp.experts.hidden_dim for b in model.blocks]
    assert len(hidden) == depth and hidden[0] == first and hidden[-1] == last
    assert hidden == sorted(hidden, reverse=True)
    stage = depth // 3
    assert [b.mlp.gate.num_experts for b in model.blocks] == [3] * stage + [4] * stage + [5] * stage


def test_biases_where_the_paper_puts_them():
    model = timm.create_model('mlit_xxs')
    assert model.patch_embed.proj.bias is None
    blk = model.blocks[0]
    assert blk.attn.qkv.bias is not None and blk.attn.proj.bias is not None
    assert blk.mlp.experts.v.bias is not None and blk.mlp.experts.w2.bias is not None
    assert blk.mlp.experts.w.bias.shape == (3, 81)
    # grouped-query attention: 6 query heads, 3 key/value heads of 18 channels
    assert blk.attn.qkv.weight.shape == (108 + 2 * 3 * 18, 108)


def test_dummy_patch_token_is_its_positional_embedding():
    """The all-zero dummy patch embeds to zero (no bias), so its token is exactly pos_embed[0]."""
    model = timm.create_model('mlit_xxs').eval()
    tokens = model.forward_embed(torch.randn(2, 3, 36, 36))
    assert tokens.shape == (2, 145, 108)
    assert torch.equal(tokens[:, 0], model.pos_embed[0, 0].expand(2, -1))
    assert torch.allclose(model.patch_embed(torch.zeros(1, 3, 36, 36)), torch.zeros(1, 144, 108))


def test_eval_output_does_not_depend_on_batch_or_call():
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs').eval()
    x = torch.randn(8, 3, 36, 36)
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(8)])
        again = model(x)
    assert torch.allclose(batch, alone, atol=1e-5)
    assert torch.equal(batch, again)


def test_training_forward_is_stochastic_and_records_the_moe_loss():
    model = timm.create_model('mlit_xxs', num_classes=10).train()
    x = torch.randn(4, 3, 36, 36)
    assert not torch.equal(model(x), model(x))
    assert len(named_moe_layers(model)) == 9
    assert model.moe_loss() > 0


def test_moe_loss_reaches_every_gate_through_cross_entropy_alone():
    """A loop that back-propagates only the cross-entropy optimises CE + Σ L_moe (the autograd hook)."""
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs', num_classes=10, moe_drop_rate=0.).train()
    model_off = timm.create_model('mlit_xxs', num_classes=10, moe_drop_rate=0., moe_loss_weight=0.).train()
    model_off.load_state_dict(model.state_dict())
    x, target = torch.randn(8, 3, 36, 36), torch.randint(0, 10, (8,))

    torch.manual_seed(1)
    hooked = torch.autograd.grad(F.cross_entropy(model(x), target), [b.mlp.gate.weight for b in model.blocks])
    torch.manual_seed(1)
    out = model_off(x)
    explicit = torch.autograd.grad(
        F.cross_entropy(out, target) + model_off.moe_loss(), [b.mlp.gate.weight for b in model_off.blocks])
    torch.manual_seed(1)
    ce_only = torch.autograd.grad(
        F.cross_entropy(model_off(x), target), [b.mlp.gate.weight for b in model_off.blocks])
    for a, b, c in zip(hooked, explicit, ce_only):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.allclose(a, c, atol=1e-6)


@pytest.mark.parametrize('impl', ['dense', 'sparse'])
def test_model_impls_agree_with_loop(impl):
    torch.manual_seed(0)
    ref = timm.create_model('mlit_xxs', moe_impl='loop').eval()
    fast = timm.create_model('mlit_xxs', moe_impl=impl).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 36, 36)
    with torch.no_grad():
        assert torch.allclose(ref(x), fast(x), atol=1e-4)


@pytest.mark.parametrize('kwargs, x_shape, match', [
    (dict(img_size=35), None, 'not a multiple of patch_size'),
    (dict(top_k=4), None, 'top_k=4 is larger'),
    (dict(moe_impl='fastest'), None, 'unknown moe_impl'),
    (dict(global_pool='max'), None, 'global_pool'),
    (dict(), (1, 1, 36, 36), '3 input channels, got an image with 1 channels'),
    (dict(), (1, 3, 32, 32), 'built for 36x36 images, got 32x32'),
    (dict(), (3, 36, 36), r'expects images \[B, C, H, W\]'),
])
def test_bad_input_gets_an_error_that_names_the_problem(kwargs, x_shape, match):
    with pytest.raises(ValueError, match=match):
        model = timm.create_model('mlit_xxs', **kwargs)
        model(torch.randn(*x_shape))


def test_head_pooling_and_reset():
    model = timm.create_model('mlit_xxs', num_classes=10).eval()
    x = torch.randn(2, 3, 36, 36)
    feats = model.forward_features(x)
    assert feats.shape == (2, 145, 108)
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])
    model.reset_classifier(5, 'avg')
    assert model.get_classifier().out_features == 5
    assert torch.allclose(model.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
    model.reset_classifier(0)
    assert model(x).shape == (2, 108)


def test_forward_intermediates_and_features_only():
    model = timm.create_model('mlit_xxs').eval()
    x = torch.randn(2, 3, 36, 36)
    final, inter = model.forward_intermediates(x, indices=[2, 8])
    assert [t.shape for t in inter] == [(2, 108, 12, 12)] * 2
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    feats = timm.create_model('mlit_xxs', features_only=True, out_indices=(-2, -1)).eval()
    assert [f.shape for f in feats(x)] == [(2, 108, 12, 12)] * 2
    assert feats.feature_info.channels() == [108, 108]


def test_group_matcher_gives_layer_decay_stem_smallest_head_one():
    from timm.optim import create_optimizer_v2
    model = timm.create_model('mlit_xxs', num_classes=10)
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    scale_of = {}
    for group in opt.param_groups:
        for p in group['params']:
            scale_of[p] = group['lr_scale']
    named = dict(model.named_parameters())
    assert len(scale_of) == len(named)  # no parameter lost
    depth = 9
    assert scale_of[named['pos_embed']] == pytest.approx(0.9 ** (depth + 1))
    assert scale_of[named['patch_embed.proj.weight']] == pytest.approx(0.9 ** (depth + 1))
    for i in range(depth):
        assert scale_of[named[f'blocks.{i}.mlp.gate.weight']] == pytest.approx(0.9 ** (depth - i))
    assert scale_of[named['head.weight']] == scale_of[named['head.bias']] == 1.0
    # timm's convention: the final norm joins the last block's group
    assert scale_of[named['norm.weight']] == scale_of[named['blocks.8.norm1.weight']]
    no_decay_ids = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    no_decay = {n for n, p in named.items() if id(p) in no_decay_ids}
    assert {'pos_embed', 'blocks.0.mlp.experts.w.bias', 'norm.weight'} <= no_decay
    assert 'blocks.0.mlp.experts.w.weight' not in no_decay


def test_checkpoint_filter_resamples_pos_embed_and_adapts_channels():
    src = timm.create_model('mlit_xxs', num_classes=10)
    dst = timm.create_model('mlit_xxs', num_classes=10, img_size=48, in_chans=1)
    sd = checkpoint_filter_fn({'state_dict': src.state_dict()}, dst)
    assert sd['pos_embed'].shape == (1, 1 + 16 * 16, 108)
    assert torch.equal(sd['pos_embed'][:, 0], src.pos_embed[:, 0])  # the dummy token's embedding is kept
    assert sd['patch_embed.proj.weight'].shape == (108, 1, 3, 3)
    dst.load_state_dict(sd)
    assert dst.eval()(torch.randn(1, 1, 48, 48)).shape == (1, 10)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs', num_classes=10, moe_drop_rate=0.).train()
    x = torch.randn(2, 3, 36, 36)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(5)
        model(x).sum().backward()
        grads.append(model.blocks[4].mlp.experts.w.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize('name, value, error', [
    ('num_experts', (), ValueError),
    ('num_experts', (3, 0, 5), ValueError),
    ('num_experts', 0, ValueError),
    ('num_experts', (3.5, 4, 5), TypeError),
    ('num_experts', '345', TypeError),
    ('depth', 0, ValueError),
    ('depth', 9.0, TypeError),
    ('top_k', 2.5, TypeError),
    ('top_k', 0, ValueError),
    ('drop_path_rate', 2, ValueError),
    ('drop_rate', -0.1, ValueError),
    ('pos_drop_rate', 1.0, ValueError),
    ('proj_drop_rate', float('nan'), ValueError),
    ('attn_drop_rate', '0.1', TypeError),
    ('moe_drop_rate', 1.5, ValueError),
    ('moe_loss_coef', -1e-2, ValueError),
    ('moe_loss_weight', -1., ValueError),
    ('embed_dim', 100, ValueError),
    ('embed_dim', 0, ValueError),
    ('num_heads', 0, ValueError),
    ('num_kv_heads', 4, ValueError),
    ('hidden_dims', (81,), ValueError),
    ('hidden_dims', (81, 0), ValueError),
    ('num_classes', -1, ValueError),
    ('in_chans', 3.0, TypeError),
    ('patch_size', 0, ValueError),
    ('img_size', (36,), ValueError),
    ('img_size', 36.0, TypeError),
    ('noisy_gating', 'no', TypeError),
    ('norm_layer', 'layernorm', TypeError),
    ('expert_shared', 3, TypeError),
    ('dtype', torch.int64, TypeError),
])
def test_bad_constructor_argument_is_refused_at_once_by_name_and_value(name, value, error):
    with pytest.raises(error) as e:
        timm.create_model('mlit_xxs', **{name: value})
    assert name in str(e.value) and repr(value) in str(e.value), str(e.value)


@pytest.mark.parametrize('dtype, match', [
    (torch.uint8, 'floating-point images, got a tensor of dtype torch.uint8'),
    (torch.int64, 'floating-point images, got a tensor of dtype torch.int64'),
    (torch.float16, 'torch.float16 images, but its parameters are torch.float32'),
])
def test_input_of_the_wrong_dtype_gets_an_error_that_names_it(dtype, match):
    model = timm.create_model('mlit_xxs').eval()
    with pytest.raises(TypeError, match=match):
        model(torch.zeros(1, 3, 36, 36, dtype=dtype))
    with pytest.raises(TypeError, match='mLiT expects a torch.Tensor'):
        model(torch.zeros(1, 3, 36, 36).numpy())


def test_autocast_runs_a_model_on_input_of_another_dtype():
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs').eval()
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed = model(x.half())  # float16 in, float32 parameters, bfloat16 compute
        out_bf16 = model.to(torch.bfloat16)(x.bfloat16())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16_model = model(x)  # float32 in, bfloat16 parameters
    for out in (mixed, out_bf16, bf16_model):
        assert out.shape == ref.shape and (out.float() - ref).abs().max() < 0.2


def test_fx_traced_and_scripted_models_keep_the_input_checks():
    from timm.models import create_feature_extractor, get_graph_node_names
    model = timm.create_model('mlit_xxs').eval()
    x = torch.randn(2, 3, 36, 36)
    last = get_graph_node_names(model)[1][-1]
    traced = create_feature_extractor(model, return_nodes=[last])
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(traced(x)[last], model(x), atol=1e-5)
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
    for m in (traced, scripted):
        with pytest.raises(Exception, match='floating-point images'):
            m(x.to(torch.uint8))
        with pytest.raises(Exception, match='built for 36x36 images, got 32x32'):
            m(x[..., :32, :32])
    with pytest.raises(TypeError, match='torch.float64 images'):
        traced(x.double())


def test_model_code_imports_timm_names_from_its_public_modules_where_timm_exports_them():
    """A private timm module (`timm.x._y`) only for a name that its public package does not export."""
    import ast
    import importlib
    from pathlib import Path
    pkg = Path(timm_mlit.__file__).parent
    private = []
    for path in [pkg / 'mlit.py', pkg / 'mae.py', *sorted((pkg / 'layers').glob('*.py'))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'timm':
                parts = node.module.split('.')
                public = '.'.join(parts[:next((i for i, p in enumerate(parts) if p.startswith('_')), len(parts))])
                if public != node.module:
                    exported = importlib.import_module(public)
                    private += [f'{path.name}: {a.name} from {node.module}, timm exports it as {public}.{a.name}'
                                for a in node.names if hasattr(exported, a.name)]
    assert not private, private
