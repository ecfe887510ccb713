"""The model card timm-mlit-publish writes (timm_mlit/model_card.py): timm's layout, the measured stats, the base
model, the training args and commands, and usage snippets that run as written."""
import argparse
import re

import huggingface_hub
import huggingface_hub.constants
import timm
import torch
import yaml
from hub_helpers import HUB_ID, _card_python_blocks, _encoder_safetensors, _model, _out, _publish, _x, put_in_hf_cache

import timm_mlit  # noqa: F401
from timm_mlit import hub

# --------------------------------------------------------------------------------------------- usage snippets, verbatim

def test_model_card_usage_snippets_run_as_written(published, offline_hf):
    """Every python block of the card, verbatim, against the folder placed in a Hugging Face cache."""
    put_in_hf_cache(published['folder'], offline_hf, HUB_ID)
    blocks = _card_python_blocks(published['folder'])
    assert len(blocks) == 3  # image classification, feature map extraction, image embeddings
    for code in blocks:
        namespace = {}
        exec(compile(code, 'model card', 'exec'), namespace)
        model = namespace['model']
        assert isinstance(namespace['output'], (torch.Tensor, list))
        assert model.pretrained_cfg.get('tag') == 'mae_ft_cifar100'
    # the classification block gives the published model's outputs on its image
    namespace = {}
    exec(blocks[0], namespace)
    x = namespace['transforms'](namespace['img']).unsqueeze(0)
    assert torch.equal(namespace['output'], _out(published['model'], x))


def test_encoder_card_usage_snippets_run_as_written(tmp_path, offline_hf):
    expected = _model(0, seed=2)
    out = hub.publish(_encoder_safetensors(tmp_path, expected), 'mlit_xxs', tmp_path / 'enc', tag='mae_in_cifar100',
                      repo_id='me/mlit_xxs.mae_in_cifar100')
    put_in_hf_cache(out, offline_hf, 'me/mlit_xxs.mae_in_cifar100')
    blocks = _card_python_blocks(out)
    assert blocks and 'Image Classification' not in (out / 'README.md').read_text()  # no head to classify with
    for code in blocks:
        namespace = {}
        exec(compile(code, 'model card', 'exec'), namespace)
        assert namespace['model'].pretrained_cfg.get('tag') == 'mae_in_cifar100'


# ----------------------------------------------------------------------------------------------- the model card

def test_model_stats_count_macs_and_the_outputs_of_conv_linear_and_attention():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, kernel_size=2, stride=2)  # [1, 4, 4, 4]
            self.norm = torch.nn.LayerNorm(4)  # not a matmul: its output is not counted
            self.fc = torch.nn.Linear(4, 6)  # [1, 16, 6]

        def forward(self, x):
            x = self.norm(self.conv(x).flatten(2).transpose(1, 2))  # [1, 16, 4]
            q = k = v = self.fc(x).reshape(1, 16, 2, 3).transpose(1, 2)  # [1, 2, 16, 3]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).relu()

    stats = hub.model_stats(Tiny(), (3, 8, 8))
    tokens, heads, head_dim = 16, 2, 3
    conv_out, fc_out, scores = 4 * 4 * 4, tokens * 6, heads * tokens * tokens
    assert stats['params'] == sum(p.numel() for p in Tiny().parameters())
    assert stats['activations'] == conv_out + fc_out + scores + heads * tokens * head_dim
    assert stats['macs'] == conv_out * 3 * 2 * 2 + fc_out * 4 + 2 * scores * head_dim


def test_model_stats_do_not_depend_on_the_attention_kernel_or_the_moe_implementation():
    model = _model(10)
    stats = hub.model_stats(model, (3, 36, 36))
    for block in model.blocks:
        block.attn.fused_attn = not block.attn.fused_attn
    assert hub.model_stats(model, (3, 36, 36)) == stats
    for impl in ('dense', 'loop'):
        for block in model.blocks:
            block.mlp.impl = impl
        assert hub.model_stats(model, (3, 36, 36)) == stats
        assert all(block.mlp.impl == impl for block in model.blocks)  # the model is left as it was


def _card_stats(text: str):
    return {k: float(v) for k, v in re.findall(r'^ {2}- (Params \(M\)|GMACs|Activations \(M\)): ([0-9.]+)$', text,
                                                re.M)}


def test_model_card_has_timm_layout_and_measured_stats(published):
    card = huggingface_hub.ModelCard.load(published['folder'] / 'README.md')
    text = card.text
    for heading in ('# Model card for mlit_xxs.mae_ft_cifar100', '## Model Details', '## Model Usage',
                    '### Image Classification', '### Feature Map Extraction', '### Image Embeddings', '## Citation'):
        assert re.search(rf'^{re.escape(heading)}$', text, re.M), heading
    assert text.index('## Model Details') < text.index('## Model Usage') < text.index('## Citation')
    for item in ('- **Model Type:** Image classification / feature backbone', '- **Model Stats:**',
                 '  - Image size: 36 x 36', '- **Papers:**', '  - How Lightweight Can A Vision Transformer Be: ',
                 '  - Masked Autoencoders Are Scalable Vision Learners: ', '- **Dataset:** cifar100',
                 '- **Pretrain Dataset:** cifar100', '- **Original:** '):
        assert item in text, item
    stats = hub.model_stats(published['model'], (3, 36, 36))
    assert _card_stats(text) == {'Params (M)': round(stats['params'] / 1e6, 3),
                                 'GMACs': round(stats['macs'] / 1e9, 3),
                                 'Activations (M)': round(stats['activations'] / 1e6, 3)}


def test_fine_tuned_card_names_its_base_model_and_publishes_the_training_args(tmp_path):
    model = _model(10, seed=7)
    args = argparse.Namespace(model='mlit_xxs', lr=5e-3, epochs=30, input_size=(3, 36, 36), model_kwargs={},
                              pretrained_path='output/pretrain/run/encoder.safetensors', gp=None)
    checkpoint = tmp_path / 'model_best.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'arch': 'mlit_xxs', 'args': args}, checkpoint)
    out = tmp_path / 'out'
    assert _publish(tmp_path, checkpoint, out, '--tag', 'mae_ft_fashion_mnist', '--dataset', 'fashion_mnist',
                    '--base-model', 'timm-mlit/mlit_xxs.mae_in_fashion_mnist') == 0
    card = huggingface_hub.ModelCard.load(out / 'README.md')
    assert card.data.base_model == 'timm-mlit/mlit_xxs.mae_in_fashion_mnist'
    assert 'timm-mlit/mlit_xxs.mae_in_fashion_mnist' in card.text and 'training_args.yaml' in card.text
    recorded = yaml.safe_load((out / 'training_args.yaml').read_text())
    assert recorded == {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)  # the extra file does not disturb timm
    assert torch.equal(_out(loaded, _x()), _out(model, _x()))


def test_the_card_shows_the_commands_that_made_the_weights(tmp_path, capsys):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    commands = tmp_path / 'commands.sh'
    lines = ["timm-mlit-pretrain -c train_configs/pretrain/mmlit_xxs_fashion_mnist.yaml --epochs 10",
             "timm-mlit-run train.py -c train_configs/finetune/mmlit_xxs_fashion_mnist.yaml --aa '' -b 128"]
    commands.write_text(f'# made on 2 CPU cores\n{lines[0]}\n\n{lines[1]}\n')
    assert _publish(tmp_path, checkpoint, tmp_path / 'out', '--commands', str(commands)) == 0
    text = (tmp_path / 'out' / 'README.md').read_text()
    assert '## Training\n' in text and '```bash\n# made on 2 CPU cores\n' + '\n'.join(lines) + '\n```' in text
    commands.write_text('# nothing but a comment\n')
    assert _publish(tmp_path, checkpoint, tmp_path / 'out2', '--commands', str(commands)) == 1
    assert 'holds no command' in capsys.readouterr().err and not (tmp_path / 'out2').exists()
    assert _publish(tmp_path, checkpoint, tmp_path / 'out2', '--commands', str(tmp_path / 'none.sh')) == 1
    assert '--commands' in capsys.readouterr().err and not (tmp_path / 'out2').exists()


def test_a_base_model_that_is_no_hub_repository_is_an_error(tmp_path, capsys):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    assert _publish(tmp_path, checkpoint, tmp_path / 'out', '--base-model', 'not a repo') == 1
    assert '--base-model' in capsys.readouterr().err and not (tmp_path / 'out').exists()


def test_no_training_args_leaves_them_out(tmp_path):
    checkpoint = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': _model(10).state_dict(), 'arch': 'mlit_xxs',
                'args': argparse.Namespace(model='mlit_xxs', data_dir='/home/me/data')}, checkpoint)
    assert _publish(tmp_path, checkpoint, tmp_path / 'out', '--no-training-args') == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert 'training_args' not in (tmp_path / 'out' / 'README.md').read_text()
