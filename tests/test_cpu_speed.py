"""The CPU fast paths: chunked attention and the cheaper dropout mask equal their references, the model takes them
where they pay (bfloat16 on a CPU), and the precision is chosen from what the machine has."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_mlit  # noqa: F401
import timm_mlit.layers.ops.cpu_attention as chunked
from timm_mlit import precision
from timm_mlit.layers import GroupedQueryAttention
from timm_mlit.layers.dropout import Dropout
from timm_mlit.layers.ops import ChunkedAttention, MaskDropout, chunked_attention, keep_mask
from timm_mlit.precision import auto_precision_args


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks of 3 batch entries for 29 x 15 float64 scores, so a batch of 10 runs as 4 blocks, the last short."""
    monkeypatch.setattr(chunked, 'CHUNK_BYTES', 29 * 15 * 8 * 3)


def _qkv(b=10, m=29, n=15, d=18, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, rows, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for rows in (m, n, n)]


@pytest.mark.slow
def test_chunked_attention_passes_gradcheck_across_blocks(small_chunks):
    q, k, v = _qkv()
    assert chunked.attention_chunk(q, k) == 3
    assert torch.autograd.gradcheck(lambda a, b, c: ChunkedAttention.apply(a, b, c, 0.3), (q, k, v))


def test_chunked_attention_equals_sdpa_in_float64_with_and_without_grad(small_chunks):
    q, k, v = _qkv()
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(chunked_attention(q, k, v, 18 ** -0.5), ref, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(chunked_attention(q, k, v, 18 ** -0.5), ref, atol=1e-12)


def test_chunked_attention_in_bfloat16_is_as_close_to_float64_as_pytorchs_bf16_attention():
    """Forward and gradients against float64, measured against SDPA's own bfloat16 error on the same inputs."""
    q, k, v = _qkv(b=24, m=290, n=145, seed=1)
    grad = torch.randn(24, 290, 18, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)

    def errors(fn):
        qb, kb, vb = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        out = fn(qb, kb, vb)
        grads = torch.autograd.grad(out, (qb, kb, vb), grad.bfloat16())
        return [(a.double() - b).abs().max().item() for a, b in zip((out,) + grads, (ref,) + ref_grads)]

    ours = errors(lambda a, b, c: chunked_attention(a, b, c, 18 ** -0.5))
    sdpa = errors(F.scaled_dot_product_attention)
    for mine, theirs in zip(ours, sdpa):
        assert mine <= 2 * theirs + 1e-3, (ours, sdpa)


def _count_calls(monkeypatch):
    calls = []
    original = chunked.ChunkedAttention.apply

    def counting(*args):
        calls.append(args[0].dtype)
        return original(*args)
    monkeypatch.setattr(chunked.ChunkedAttention, 'apply', counting)
    return calls


def test_attention_takes_the_chunked_path_in_bfloat16_on_cpu_only(monkeypatch):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(108, 6, 3).train()
    x = torch.randn(4, 145, 108)
    calls = _count_calls(monkeypatch)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_bf16 = attn(x)
    assert calls == [torch.bfloat16]
    y32 = attn(x)  # float32: PyTorch's SDPA
    assert calls == [torch.bfloat16]
    assert (y_bf16.float() - y32).abs().max() < 0.05 * y32.abs().max()
    attn.attn_drop.p = 0.1  # attention dropout: only SDPA has it
    with torch.autocast('cpu', dtype=torch.bfloat16):
        attn(x)
    assert calls == [torch.bfloat16]


def test_bfloat16_model_gradients_follow_float32_ones():
    """mlit_xxs trained one step under bf16 autocast (chunked attention; dropout and gate noise off) gives
    gradients pointing the way float32's do."""
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs', num_classes=10, moe_drop_rate=0., noisy_gating=False).train()
    x, target = torch.randn(8, 3, 36, 36), torch.randint(0, 10, (8,))

    def grads(autocast):
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            F.cross_entropy(model(x), target).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    g32, g16 = grads(False), grads(True)
    assert F.cosine_similarity(g32, g16, dim=0) > 0.99


def test_keep_mask_rate_and_repeatability():
    torch.manual_seed(3)
    mask = keep_mask((1000, 1000), 0.1)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert abs(mask.float().mean().item() - 0.9) < 5 * math.sqrt(0.09 / 1e6)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1000, 1000), 0.1), mask)
    assert keep_mask((7, 3), 0.).all()
    odd = keep_mask((5, 3), 0.5)  # not a multiple of the 4 lanes of a word
    assert odd.shape == (5, 3)


def test_mask_dropout_keeps_the_expectation_and_passes_the_same_mask_back():
    torch.manual_seed(0)
    x = torch.full((200_000,), 2., requires_grad=True)
    y = MaskDropout.apply(x, 0.25)
    kept = y != 0
    assert abs(y.mean().item() - 2.) < 0.02
    assert torch.allclose(y[kept], torch.tensor(2. / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.tensor(1. / 0.75))
    x64 = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(1), MaskDropout.apply(t, 0.3))[1], (x64,))


def test_dropout_module_is_nn_dropout_outside_cpu_training():
    drop = Dropout(0.1)
    assert isinstance(drop, nn.Dropout) and repr(drop) == repr(nn.Dropout(0.1))
    x = torch.randn(100, 10)
    assert torch.equal(drop.eval()(x), x)
    drop.train()
    assert (drop(x) == 0).any()
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    assert torch.equal(Dropout(0.).train()(x), x)
    scripted = torch.jit.script(Dropout(0.5).train())
    assert ((scripted(x) == 0).float().mean() - 0.5).abs() < 0.1


def test_precision_follows_the_environment_and_the_device(monkeypatch):
    monkeypatch.setenv(precision.PRECISION_ENV, 'float32')
    assert precision.auto_amp_dtype('cpu') is None
    monkeypatch.setenv(precision.PRECISION_ENV, 'bfloat16')
    assert precision.auto_amp_dtype('cpu') is torch.bfloat16
    monkeypatch.setenv(precision.PRECISION_ENV, 'fp16')
    with pytest.raises(ValueError, match='TIMM_MLIT_PRECISION'):
        precision.auto_amp_dtype('cpu')
    monkeypatch.delenv(precision.PRECISION_ENV)
    for has in (True, False):
        monkeypatch.setattr(precision, 'cpu_has_bf16', lambda has=has: has)
        assert precision.auto_amp_dtype('cpu') is (torch.bfloat16 if has else None)


def test_cpu_bf16_probe_reads_cpuinfo_without_torchs_probes(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, '_is_avx512_bf16_supported', raising=False)
    flags = open('/proc/cpuinfo').read().split()
    assert precision.cpu_has_bf16() == ('avx512_bf16' in flags or 'amx_bf16' in flags)


def test_run_precision_takes_the_flags_then_the_environment_then_the_resumed_run_then_the_device(monkeypatch):
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: True)
    bf16, fp16 = torch.bfloat16, torch.float16
    assert precision.run_amp_dtype('cpu', amp=False, amp_dtype='bfloat16')[0] is None  # --no-amp overrides a recipe
    assert precision.run_amp_dtype('cpu', amp_dtype='bfloat16')[0] is bf16  # --amp-dtype alone is autocast
    assert precision.run_amp_dtype('cpu', amp=True)[0] is bf16  # CPU autocast: no float16 here
    assert precision.run_amp_dtype('cuda', amp=True)[0] is fp16  # timm's default on CUDA
    with pytest.raises(ValueError, match='--amp-dtype must be float16 or bfloat16, got int8'):
        precision.run_amp_dtype('cpu', amp_dtype='int8')
    fp32_run = {'amp': False, 'amp_dtype': 'float16'}  # a run trained in float32 (timm train.py's default)
    assert precision.run_amp_dtype('cpu', resumed=fp32_run) == (None, 'as the resumed run was trained')
    assert precision.run_amp_dtype('cpu', resumed={'amp': True, 'amp_dtype': 'bfloat16'})[0] is bf16
    assert precision.run_amp_dtype('cpu', resumed={'amp': None})[0] is bf16  # recorded nothing: the device decides
    with pytest.raises(ValueError, match='trained in float16 autocast, which cpu cannot run here'):
        precision.run_amp_dtype('cpu', resumed={'amp': True, 'amp_dtype': 'float16'})  # a GPU run, resumed on a CPU
    assert precision.run_amp_dtype('cpu', amp_dtype='bfloat16', resumed=fp32_run)[0] is bf16  # asked for: asked
    monkeypatch.setenv(precision.PRECISION_ENV, 'bfloat16')
    assert precision.run_amp_dtype('cpu', resumed=fp32_run) == (bf16, 'TIMM_MLIT_PRECISION=bfloat16')
    monkeypatch.delenv(precision.PRECISION_ENV)
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: False)
    assert precision.run_amp_dtype('cpu') == (None, 'cpu has no bfloat16 units')


def test_launcher_resumes_a_run_in_the_precision_its_checkpoint_records(monkeypatch, tmp_path, capsys):
    import argparse
    monkeypatch.setenv(precision.PRECISION_ENV, 'auto')
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: True)
    ckpt = tmp_path / 'last.pth.tar'
    args = ['--device', 'cpu', '--resume', str(ckpt)]
    torch.save({'state_dict': {}, 'args': argparse.Namespace(amp=False, amp_dtype='float16')}, ckpt)
    assert auto_precision_args(args) == args
    assert 'float32 (as the resumed run was trained)' in capsys.readouterr().err
    torch.save({'state_dict': {}, 'args': argparse.Namespace(amp=True, amp_dtype='bfloat16')}, ckpt)
    assert auto_precision_args(args) == args + ['--amp', '--amp-dtype', 'bfloat16']
    ckpt.write_bytes(b'not a checkpoint')  # train.py names that problem; the launcher takes the device's choice
    assert auto_precision_args(args) == args + ['--amp', '--amp-dtype', 'bfloat16']


def test_launcher_adds_bfloat16_only_where_nothing_sets_a_precision(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.PRECISION_ENV, 'bfloat16')
    args = ['--model', 'mlit_xxs', '--device', 'cpu']
    assert auto_precision_args(args) == args + ['--amp', '--amp-dtype', 'bfloat16']
    assert auto_precision_args(['--device=cpu']) == ['--device=cpu', '--amp', '--amp-dtype', 'bfloat16']
    assert auto_precision_args(args + ['--amp']) == args + ['--amp']
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('amp: false\ndevice: cpu\n')
    assert auto_precision_args(['-c', str(recipe)]) == ['-c', str(recipe)]
    recipe.write_text('device: cpu\n')
    assert auto_precision_args(['-c', str(recipe)])[-3:] == ['--amp', '--amp-dtype', 'bfloat16']
    assert auto_precision_args(args + ['--', 'x']) == args + ['--amp', '--amp-dtype', 'bfloat16', '--', 'x']
    monkeypatch.setenv(precision.PRECISION_ENV, 'float32')
    assert auto_precision_args(args) == args


def test_launcher_gives_an_amp_dtype_alone_the_amp_train_py_needs(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(precision.PRECISION_ENV, 'float32')  # an explicit dtype wins over the environment
    args = ['--model', 'mlit_xxs', '--device', 'cpu', '--amp-dtype', 'bfloat16']
    assert auto_precision_args(args) == args + ['--amp']
    assert 'bfloat16 autocast (--amp added' in capsys.readouterr().err
    assert auto_precision_args(['--amp-dtype=bfloat16', '--', 'x']) == ['--amp-dtype=bfloat16', '--amp', '--', 'x']
    assert auto_precision_args(args + ['--amp']) == args + ['--amp']
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('amp_dtype: bfloat16\ndevice: cpu\n')
    assert auto_precision_args(['-c', str(recipe)]) == ['-c', str(recipe), '--amp']
    recipe.write_text('amp: false\namp_dtype: bfloat16\n')  # a recipe that says float32 stays float32
    assert auto_precision_args(['-c', str(recipe)]) == ['-c', str(recipe)]


def test_launcher_adds_precision_flags_only_to_scripts_that_have_them(tmp_path):
    from timm_mlit.script_args import read_script
    train = tmp_path / 'train.py'
    train.write_text("p.add_argument('-c', '--config')\np.add_argument('--amp-dtype')\n")
    other = tmp_path / 'mine.py'
    other.write_text("p.add_argument('-c', '--config')\n")
    assert read_script(str(train)).trains_with_amp and not read_script(str(other)).trains_with_amp


def test_dropout_rates_that_round_to_one_drop_everything():
    x = torch.randn(50, 4)
    assert torch.equal(Dropout(0.999999).train()(x), torch.zeros_like(x))  # rounds to 1 on the 2^-16 grid
    y = Dropout(0.99).train()(x)
    assert (y == 0).float().mean() > 0.9
