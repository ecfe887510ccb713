"""The package's shape: its modules import each other one way (no cycle, function-local imports included)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_mlit'


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path, modules: set) -> set:
    """The package modules that `path` imports anywhere in it (at the top or inside a function)."""
    name = _module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            targets = [base] + [f'{base}.{a.name}' for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found - {name}


def _graph():
    paths = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    modules = set(paths)
    # a package's __init__ only gathers its modules' names: importing `pkg.mod` runs `pkg/__init__` first, which is
    # not a dependency of `pkg.mod` on its siblings, so edges into a package stand for its own __init__ alone
    return {name: _imports(path, modules) for name, path in paths.items()}


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_walk_finds_a_planted_cycle():
    assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycle_between_the_package_modules():
    graph = _graph()
    assert 'timm_mlit.layers.moe' in graph and graph['timm_mlit.layers.moe']
    # edges from a package's __init__ to its own modules are how it gathers them, not a cycle
    graph = {n: {d for d in deps if not (n.endswith(('timm_mlit', '.layers', '.ops')) and d.startswith(n + '.'))}
             for n, deps in graph.items()}
    graph = {n: {d for d in deps if not (n.startswith(d + '.'))} for n, deps in graph.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, ' -> '.join(cycle)


def test_no_module_of_the_package_is_over_450_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob('*.py')
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f'split these by job: {long}'


def test_every_console_script_answers_version(capsys):
    """Each tool of [project.scripts] (and the main job) prints its name and version for --version, whatever else it
    requires, and ends with status 0."""
    import importlib
    import sys

    import pytest

    from timm_mlit import __version__
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip('tomli')
    scripts = tomllib.loads((PACKAGE.parent / 'pyproject.toml').read_text())['project']['scripts']
    entry_points = dict(scripts, **{'timm-mlit': 'timm_mlit.__main__:main'})
    for prog, target in entry_points.items():
        module, func = target.split(':')
        main = getattr(importlib.import_module(module), func)
        try:
            status = main(['--version'])
        except SystemExit as e:
            status = e.code
        assert status in (0, None), prog
        assert capsys.readouterr().out.strip().endswith(f'{prog} {__version__}'), prog
