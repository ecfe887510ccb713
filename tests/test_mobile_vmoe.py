"""Mobile V-MoE (arXiv 2309.04354): per-image routing, MLP experts, the super-class router loss and super-classes."""
import json
import pickle

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_mlit  # noqa: F401
from timm_mlit.layers import ImageRouter, MlpExperts, MoE, per_token
from timm_mlit.mobile_vmoe import MobileVMoE, image_routers
from timm_mlit.superclasses import (
    SuperClasses,
    cifar100_coarse,
    cluster_confusion,
    load_superclasses,
    superclasses_from_confusion,
)
from timm_mlit.task import RouterTaskError, SuperClassRouterTask, superclass_targets

SMALL = 'mobile_vmoe_vit_xxs_patch3_36'


def small_model(**kwargs) -> MobileVMoE:
    args = dict(num_classes=6, num_experts=3, depth=4, moe_layers=2)
    return timm.create_model(SMALL, **dict(args, **kwargs))


def routings_seen(model, x):
    """The routing each MoE layer's experts got in one forward, by layer index."""
    seen = {}
    hooks = [blk.mlp.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[1]))
             for i, blk in enumerate(model.blocks) if blk.is_moe]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def literal_per_image(experts: MlpExperts, x, gates, top_idx):
    """y[b] = Σ_{i chosen by image b} g_bi e_i(x[b]), one image and one expert at a time."""
    out = []
    for b in range(x.shape[0]):
        out.append(sum(gates[b, i] * experts.forward_expert(x[b], int(i)) for i in top_idx[b]))
    return torch.stack(out)


@pytest.mark.parametrize('top_k', [1, 2])
def test_every_token_of_an_image_follows_one_routing_in_all_moe_layers(top_k):
    torch.manual_seed(0)
    model = small_model(top_k=top_k).eval()
    seen = routings_seen(model, torch.randn(5, 3, 36, 36))
    assert sorted(seen) == [2, 3]
    first, second = seen[2], seen[3]
    assert first.top_idx.shape == (5, top_k)  # one decision per image, not per token
    assert torch.equal(first.top_idx, second.top_idx) and torch.equal(first.gates, second.gates)
    assert ((first.gates > 0).sum(1) == top_k).all()


def test_mlit_with_per_image_routing_routes_every_token_of_an_image_alike():
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs', moe_routing='image', num_classes=4).eval()
    seen = []
    original = model.blocks[0].mlp.experts.mix

    def mix(x, parts, routing, sparse):
        seen.append(routing.top_idx.reshape(3, 145, -1))
        return original(x, parts, routing, sparse)
    model.blocks[0].mlp.experts.mix = mix
    with torch.no_grad():
        model(torch.randn(3, 3, 36, 36))
    (top_idx,) = seen
    assert (top_idx == top_idx[:, :1]).all()  # every token of an image: its image's experts


@pytest.mark.parametrize('impl', ['loop', 'dense', 'sparse'])
def test_mlit_per_image_routing_impls_agree(impl):
    x = torch.randn(3, 3, 36, 36)
    outs, grads = {}, {}
    for name in ('loop', impl):
        torch.manual_seed(0)
        model = timm.create_model('mlit_xxs', moe_routing='image', moe_impl=name, num_classes=4, moe_drop_rate=0.)
        torch.manual_seed(1)
        out = model(x)
        (out.sum() + model.moe_loss()).backward()
        outs[name], grads[name] = out, model.blocks[0].mlp.gate.weight.grad
    assert torch.allclose(outs['loop'], outs[impl], atol=1e-5)
    assert torch.allclose(grads['loop'], grads[impl], atol=1e-5)


def test_moe_rejects_an_unknown_routing():
    with pytest.raises(ValueError, match="moe_routing 'patch'"):
        MoE(8, 8, 3, routing='patch')


@pytest.mark.parametrize('top_k', [1, 2])
def test_expert_layer_equals_a_literal_per_image_loop(top_k):
    torch.manual_seed(0)
    experts = MlpExperts(12, 20, num_experts=4).eval()
    router = ImageRouter(12, 4, top_k).eval()
    x = torch.randn(6, 7, 12)
    routing = router(x[:, 0])
    expected = literal_per_image(experts, x, routing.gates, routing.top_idx)
    assert torch.allclose(experts(x, routing), expected, atol=1e-6)
    assert torch.allclose(experts.forward_dense(x, routing), expected, atol=1e-6)


def test_router_weighs_its_choice_by_softmax_probabilities_not_renormalised():
    router = ImageRouter(4, 3, top_k=2)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3, 4))
    x = torch.tensor([[2., 1., 0., 0.]])
    routing = router(x)
    probs = torch.softmax(torch.tensor([2., 1., 0.]), 0)
    assert routing.top_idx.tolist() == [[0, 1]]
    assert torch.allclose(routing.gates, torch.tensor([[probs[0], probs[1], 0.]]))


def test_only_the_chosen_experts_get_gradients_from_an_image():
    torch.manual_seed(0)
    model = small_model(top_k=2, num_experts=4)
    x = torch.randn(1, 3, 36, 36)
    seen = routings_seen(model, x)
    chosen = set(seen[2].top_idx[0].tolist())
    model.zero_grad()
    model(x).sum().backward()
    for blk in model.blocks[2:]:
        for e in range(4):
            g = blk.mlp.fc1.weight.grad
            touched = g is not None and bool(g[e].abs().sum() > 0)
            assert touched == (e in chosen), (e, chosen)


def test_dense_twin_is_timms_vit_with_the_same_arguments():
    twin = timm.create_model(SMALL, moe_layers=0, num_classes=10).eval()
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=36, patch_size=3, embed_dim=108, depth=9,
                            num_heads=6, mlp_ratio=2).eval()
    twin.load_state_dict(vit.state_dict())  # strict: the same parameters
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        assert torch.equal(twin(x), vit(x))
    assert not image_routers(twin)


def test_dense_vit_weights_upcycle_into_every_expert():
    from timm_mlit.mobile_vmoe import _checkpoint_filter_fn
    dense = small_model(moe_layers=0)
    moe = small_model(num_experts=3)
    state = _checkpoint_filter_fn(dense.state_dict(), moe)
    moe.load_state_dict(state)  # strict
    for e in range(3):
        assert torch.equal(moe.blocks[3].mlp.fc1.weight[e], dense.blocks[3].mlp.fc1.weight)
        assert torch.equal(moe.blocks[3].mlp.fc2.bias[e], dense.blocks[3].mlp.fc2.bias)
    assert torch.equal(moe.blocks[1].mlp.fc1.weight, dense.blocks[1].mlp.fc1.weight)  # the dense blocks as they are


def test_get_intermediate_layers_of_timm_works():
    model = small_model().eval()
    with torch.no_grad():
        (out,) = model.get_intermediate_layers(torch.randn(2, 3, 36, 36), n=1)
    assert out.shape == (2, 144, 108)


def test_vit_tiny_setting_has_the_papers_parameter_counts():
    """arXiv 2309.04354 §3: the ViT-Tiny MoE activates 6.31M parameters per image; per-token routing up to 11.05M
    (all of them)."""
    model = timm.create_model('mobile_vmoe_vit_tiny_patch16_224', pretrained_cfg_overlay=dict(), num_classes=1000)
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p.numel() for p in model.blocks[-1].mlp.parameters()) // 10
    touched = total - 2 * (10 - model.top_k) * per_expert
    assert (round(total / 1e6, 2), round(touched / 1e6, 2), model.top_k) == (11.05, 6.31, 2)


def test_per_image_parameters_match_the_dense_twin_at_k1():
    moe, twin = small_model(num_experts=4), small_model(moe_layers=0)
    expert = sum(p.numel() for p in moe.blocks[2].mlp.parameters()) // 4
    router = moe.blocks[2].router.weight.numel()
    touched = sum(p.numel() for p in moe.parameters()) - 2 * 3 * expert  # one expert per MoE layer
    assert touched - router == sum(p.numel() for p in twin.parameters())


@pytest.mark.parametrize('kwargs, match', [
    (dict(top_k=4, num_experts=3), 'top_k=4 is larger than num_experts=3'),
    (dict(moe_layers=5), 'moe_layers=5 is more than'),
    (dict(num_experts=0), 'num_experts must be >= 1'),
    (dict(class_token=False, global_pool='avg'), 'class_token=False needs moe_layers=0'),
])
def test_bad_model_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_model(**kwargs)


def test_forward_intermediates_and_features_only_cover_every_block():
    model = small_model().eval()
    x = torch.randn(2, 3, 36, 36)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 4 and inter[0].shape == (2, 108, 12, 12)
    with torch.no_grad():
        assert torch.allclose(final, model.forward_features(x))
    feats = timm.create_model(SMALL, features_only=True, out_indices=(1, 3), depth=4, num_experts=3)(x)
    assert [f.shape for f in feats] == [(2, 108, 12, 12)] * 2


def test_balance_loss_reaches_the_gradients_and_moe_stats():
    from timm_mlit.layers import moe_stats
    x = torch.randn(8, 3, 36, 36)
    grads = {}
    for weight in (0., 2.):
        torch.manual_seed(0)
        model = small_model(moe_loss_weight=weight, drop_rate=0.)
        out = model(x)
        stats = moe_stats(model)
        (balance_grad,) = torch.autograd.grad(stats.loss, model.blocks[2].router.weight, retain_graph=True)
        out.sum().backward()
        grads[weight] = model.blocks[2].router.weight.grad.clone()
    assert list(stats.load) == ['blocks.2.router'] and stats.load['blocks.2.router'].sum() == 8
    assert torch.equal(model.moe_loss(), stats.loss) and stats.loss > 0
    # the hook adds weight * d(balance loss) to what the classification output gives the router
    assert torch.allclose(grads[2.] - grads[0.], 2. * balance_grad, atol=1e-6)
    assert balance_grad.abs().sum() > 0


# --- the super-class router loss ---

def _task(model, superclasses, weight=0.3):
    return SuperClassRouterTask(model, superclasses, weight, criterion=torch.nn.CrossEntropyLoss(), verbose=False)


def test_router_loss_is_cross_entropy_against_the_superclass():
    torch.manual_seed(0)
    model = small_model()
    sc = SuperClasses([0, 0, 1, 2, 2, 1])
    task = _task(model, sc)
    x, target = torch.randn(4, 3, 36, 36), torch.tensor([0, 2, 5, 3])
    torch.manual_seed(1)
    result = task(x, target)
    logits = model.blocks[2].router.last_logits
    super_target = [0, 1, 1, 2]
    by_hand = -torch.stack([F.log_softmax(logits[b], 0)[s] for b, s in enumerate(super_target)]).mean()
    assert torch.allclose(result['router_loss'], by_hand)
    assert torch.allclose(result['loss'], F.cross_entropy(result['output'], target) + 0.3 * by_hand)


def test_router_loss_under_mixup_uses_class_targets_times_the_class_to_superclass_matrix():
    torch.manual_seed(0)
    model = small_model()
    sc = SuperClasses([0, 0, 1, 2, 2, 1])
    task = _task(model, sc)
    target = torch.tensor([[0.7, 0.1, 0.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0, 0.0, 0.5]])
    result = task(torch.randn(2, 3, 36, 36), target)
    soft = torch.tensor([[0.8, 0.0, 0.2], [0.0, 1.0, 0.0]])
    assert torch.allclose(superclass_targets(target, task.class_to_super), soft)
    logp = F.log_softmax(model.blocks[2].router.last_logits, -1)
    assert torch.allclose(result['router_loss'], -(soft * logp).sum(1).mean())


def test_router_loss_trains_the_router_towards_the_superclasses():
    torch.manual_seed(0)
    model = small_model(num_classes=3, num_experts=3)
    task = _task(model, SuperClasses([2, 0, 1]), weight=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randn(12, 3, 36, 36)
    target = torch.arange(12) % 3
    for _ in range(40):
        opt.zero_grad()
        task(x, target)['loss'].backward()
        opt.step()
    model.eval()
    model(x)
    assert (model.blocks[2].router.last_logits.argmax(1) == torch.tensor([2, 0, 1])[target]).all()


def test_task_names_a_model_that_does_not_fit_the_file():
    with pytest.raises(RouterTaskError, match='num_experts=2'):
        _task(small_model(num_experts=3), SuperClasses([0, 0, 1, 1, 1, 0]))
    with pytest.raises(RouterTaskError, match='covers 4 classes, but the model has num_classes=6'):
        _task(small_model(num_experts=2), SuperClasses([0, 0, 1, 1]))
    with pytest.raises(RouterTaskError, match='exactly one per-image router'):
        _task(small_model(moe_layers=0), SuperClasses([0, 0, 1, 1, 1, 0]))


# --- super-classes ---

def test_spectral_clustering_recovers_planted_groups():
    rng = np.random.default_rng(0)
    groups = [[0, 3, 7], [1, 5], [2, 4, 6, 8, 9]]
    confusion = rng.integers(0, 3, (10, 10))
    for g in groups:
        for i in g:
            for j in g:
                confusion[i, j] += 60
    np.fill_diagonal(confusion, 900)
    found = cluster_confusion(confusion, 3)
    assert sorted(sorted(c for c in range(10) if found[c] == s) for s in range(3)) == sorted(groups)
    assert found[0] == 0


def test_superclass_file_round_trip_and_its_errors(tmp_path):
    sc = superclasses_from_confusion(np.eye(4) * 10 + 1, 2, class_names=['a', 'b', 'c', 'd'])
    path = sc.save(str(tmp_path / 'sc.json'))
    back = load_superclasses(path, num_classes=4, num_superclasses=2)
    assert back.assignment == sc.assignment and back.class_names == ['a', 'b', 'c', 'd']
    with pytest.raises(ValueError, match=r'class\(es\) \[4, 5\] of the 6 have no super-class'):
        load_superclasses(path, num_classes=6)
    with pytest.raises(ValueError, match='into 2 super-classes, but the model\'s router has 10 experts'):
        load_superclasses(path, num_superclasses=10)
    data = json.loads(open(path).read())
    data['classes'] = data['classes'][:-1] + [data['classes'][0]]
    (tmp_path / 'dup.json').write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r'lists class\(es\) \[0\] more than once'):
        load_superclasses(str(tmp_path / 'dup.json'))
    (tmp_path / 'bad.json').write_text('{"classes": 3}')
    with pytest.raises(ValueError, match='is not a super-class file'):
        load_superclasses(str(tmp_path / 'bad.json'))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_superclasses(str(tmp_path / 'none.json'))
    with pytest.raises(ValueError, match='each non-empty'):
        SuperClasses([0, 2, 2])


def test_cifar100_coarse_classes_from_its_pickles(tmp_path):
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    fine_names = [f'fine{i}'.encode() for i in range(100)]
    coarse_names = [f'coarse{i}'.encode() for i in range(20)]
    fine = list(range(100)) * 3
    train = {b'fine_labels': fine, b'coarse_labels': [f // 5 for f in fine], b'data': np.zeros((300, 3072), np.uint8)}
    for name, obj in (('train', train), ('meta', {b'fine_label_names': fine_names,
                                                 b'coarse_label_names': coarse_names})):
        with open(folder / name, 'wb') as f:
            pickle.dump(obj, f)
    sc = cifar100_coarse(str(tmp_path))
    assert sc.num_classes == 100 and sc.num_superclasses == 20
    assert sc.groups()[3] == [15, 16, 17, 18, 19] and sc.superclass_names[3] == 'coarse3'
    assert sc.class_names[17] == 'fine17'
    with pytest.raises(FileNotFoundError, match='no CIFAR-100 pickle'):
        cifar100_coarse(str(tmp_path / 'nowhere'))


def test_per_token_spreads_an_image_routing_over_its_tokens():
    router = ImageRouter(6, 4, top_k=2)
    routing = router(torch.randn(3, 6))
    tokens = per_token(routing, 5)
    assert tokens.gates.shape == (15, 4) and torch.equal(tokens.top_idx[5:10], routing.top_idx[1:2].expand(5, 2))
    assert torch.equal(tokens.load, routing.load)


def test_docs_model_table_holds_the_measured_parameter_counts():
    from readme import page
    rows = [line for line in page('docs/mobile_vmoe.md').splitlines()
            if line.startswith('| `mobile_vmoe_vit_') and line.count('|') == 7]
    assert sorted(line.split('`')[1] for line in rows) == sorted(timm.list_models('mobile_vmoe_*'))
    for line in rows:
        cells = [c.strip() for c in line.strip('|').split('|')]
        model = timm.create_model(cells[0].split('`')[1], num_classes=1000 if '224' in cells[0] else 100)
        total = sum(p.numel() for p in model.parameters())
        per_expert = sum(p.numel() for p in model.blocks[-1].mlp.parameters()) // model.num_experts
        touched = total - model.moe_layers * (model.num_experts - model.top_k) * per_expert
        assert (cells[-2], cells[-1]) == (f'{total:,}', f'{touched:,}'), cells[0]
        assert cells[3] == f'{model.moe_layers}, {model.num_experts}, {model.top_k}'


def test_docs_fashion_mnist_table_and_groups_are_the_benchmarks():
    """docs/mobile_vmoe.md's Fashion-MNIST results are the files benchmarks/mobile_vmoe_fashion_mnist.py wrote."""
    from pathlib import Path

    from readme import page
    text = page('docs/mobile_vmoe.md')
    results = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
    table = [line for line in (results / 'mobile_vmoe_fashion_mnist.md').read_text().splitlines()
             if line.startswith('|')]
    assert len(table) == 6
    for line in table:
        assert line in text.splitlines(), line
    sc = load_superclasses(str(results / 'mobile_vmoe_fashion_mnist_superclasses.json'), num_classes=10)
    for line in sc.describe().splitlines():
        assert f'- {line}' in text.splitlines(), line
    meta = json.loads((results / 'mobile_vmoe_fashion_mnist.json').read_text())['meta']
    assert f"--epochs {meta['epochs']}" in text and (results / 'mobile_vmoe_fashion_mnist_confusion.png').is_file()


@pytest.mark.parametrize('name, kwargs', [
    ('mobile_vmoe_vit_xxs_patch3_36', {}), ('mlit_xxs', dict(moe_routing='image'))])
def test_an_empty_batch_gives_empty_logits_in_eval_and_training(name, kwargs):
    model = timm.create_model(name, num_classes=10, **kwargs)
    x = torch.randn(0, 3, 36, 36)
    assert model.eval()(x).shape == (0, 10)
    y = model.train()(x)
    y.sum().backward()
    assert y.shape == (0, 10) and float(model.moe_loss()) == 0.


@pytest.mark.parametrize('top_k', [1, 2])
def test_upcycling_with_normalized_combine_gives_the_dense_logits_at_step_0(top_k):
    from timm_mlit.mobile_vmoe import _checkpoint_filter_fn
    torch.manual_seed(0)
    dense = small_model(moe_layers=0).eval()
    x = torch.randn(4, 3, 36, 36)
    for combine, same in (('normalized', True), ('softmax', False)):
        moe = small_model(num_experts=4, top_k=top_k, router_combine=combine)
        moe.load_state_dict(_checkpoint_filter_fn(dense.state_dict(), moe))
        with torch.no_grad():
            diff = (moe.eval()(x) - dense(x)).abs().max().item()
        assert (diff < 1e-5) == same, (combine, diff)  # the V-MoE weights sum to < 1: the branch is scaled down


def test_normalized_combine_weights_sum_to_one_and_still_train_a_top1_router():
    from timm_mlit.layers import ImageRouter
    router = ImageRouter(8, num_experts=4, top_k=1, combine='normalized')
    x = torch.randn(5, 8)
    routing = router(x)
    torch.testing.assert_close(routing.gates.sum(1), torch.ones(5))
    (routing.gates * torch.randn(5, 4)).sum().backward()
    assert router.weight.grad.abs().sum() > 0  # plain renormalisation would give the router no gradient at k = 1
    with pytest.raises(ValueError, match="router_combine 'mean'"):
        ImageRouter(8, 4, combine='mean')


def test_size_sweep_table_is_the_counters_and_lists_every_registered_size():
    import json
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / 'benchmarks'
    sys.path.insert(0, str(bench))
    from mobile_vmoe_sizes import measure
    recorded = {r['model']: r for r in json.loads((bench / 'results' / 'mobile_vmoe_sizes.json').read_text())['rows']}
    assert set(recorded) == set(timm.list_models('mobile_vmoe_*'))
    for row in measure(['mobile_vmoe_vit_6x96_patch32_224', 'mobile_vmoe_vit_xxs_patch3_36']):
        assert row == recorded[row['model']]
    # the sweep's ends: ViT-Tiny's 11.05M / 6.31M (paper §3), and a dense twin of about 54 M multiply-adds
    tiny = recorded['mobile_vmoe_vit_tiny_patch16_224']
    assert (tiny['params_m'], tiny['touched_m']) == (11.05, 6.31)
    assert abs(recorded['mobile_vmoe_vit_6x96_patch32_224']['dense_mmac'] - 54) < 0.1 * 54


def test_docs_compute_table_is_the_size_benchmarks():
    import json
    from pathlib import Path

    from readme import page
    results = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results' / 'mobile_vmoe_sizes.json'
    by_model = {r['model']: r for r in json.loads(results.read_text())['rows']}
    rows = [line for line in page('docs/mobile_vmoe.md').splitlines()
            if line.startswith('| `mobile_vmoe_vit_') and line.count('|') == 5]
    assert sorted(line.split('`')[1] for line in rows) == sorted(by_model)
    for line in rows:
        cells = [c.strip() for c in line.strip('|').split('|')]
        r = by_model[cells[0].strip('`')]
        assert cells[1:] == [f"{r['mmac']:g}", f"{r['dense_mmac']:g}", f"{r['dense_params_m']:g}"], cells[0]


@pytest.mark.parametrize('kwargs', [{}, dict(moe_routing='image')])
def test_superclass_loss_refuses_mlit_and_says_why(kwargs):
    from timm_mlit.superclasses import RouterTaskError
    from timm_mlit.task import the_router
    with pytest.raises(RouterTaskError, match='expert counts differ'):
        the_router(timm.create_model('mlit_xxs', num_classes=10, **kwargs))


def test_moe_loss_of_a_dense_model_without_a_class_token_is_zero():
    model = small_model(moe_layers=0, class_token=False, global_pool='avg')
    model.train()(torch.randn(2, 3, 36, 36))
    assert float(model.moe_loss()) == 0.
