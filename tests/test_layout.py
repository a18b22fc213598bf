"""The package layout: every import (module-level and inside functions) goes down the layers that
src/tmdm/__init__.py lists, the module graph has no cycle, and every package says what it owns."""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / 'src' / 'tmdm'

# Lowest first. A module may import its own package and anything in a lower layer; packages that
# share a layer do not import each other.
LAYERS = (('errors', 'storage', 'vocab'), ('parallel',), ('model', 'tokenizers', 'data'), ('diffusion', 'optim'),
          ('config',), ('datasets',), ('training',), ('generation',), ('evaluation',), ('export',), ('tools', 'scaling'),
          ('cli',))
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules():
  for path in sorted(SRC.rglob('*.py')):
    rel = path.relative_to(SRC.parent).with_suffix('')
    parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
    yield '.'.join(parts), path


def _imports(name, path):
  """Every tmdm module `name` imports, anywhere in the file, as dotted names."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith('tmdm'))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
      if base.startswith('tmdm'):
        for a in node.names:  # `from tmdm.x import y`: y may be a module or a name of tmdm.x.
          yield f'{base}.{a.name}' if _is_module(f'{base}.{a.name}') else base


def _is_module(dotted):
  path = SRC.parent.joinpath(*dotted.split('.'))
  return path.with_suffix('.py').exists() or path.is_dir()


MODULES = dict(_modules())
GRAPH = {name: sorted(set(_imports(name, path)) - {name}) for name, path in MODULES.items()}


def _part(module):
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else None


def test_every_module_is_in_a_layer():
  assert {_part(m) for m in MODULES if _part(m)} <= set(LAYER), 'a package is missing from LAYERS'


@pytest.mark.parametrize('module', sorted(m for m in MODULES if _part(m)))
def test_imports_go_down_the_layers(module):
  mine = _part(module)
  bad = [target for target in GRAPH[module]
         if _part(target) and _part(target) != mine and LAYER[_part(target)] >= LAYER[mine]]
  assert not bad, f'{module} (layer {LAYER[mine]}) imports {bad} (same or higher layer)'


def test_no_import_cycles():
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for target in GRAPH.get(m, ()):
      if target not in MODULES:
        continue
      if state.get(target) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(target):] + [target]))
      if target not in state:
        visit(target)
    stack.pop()
    state[m] = 'done'
  for m in MODULES:
    if m not in state:
      visit(m)


def test_every_package_says_what_it_owns():
  for init in SRC.rglob('__init__.py'):
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 12, f'{init.relative_to(SRC.parent)} needs a docstring: what it owns'


def test_the_checker_sees_a_bad_import(tmp_path):
  """The layer check itself fails on an upward import (a check that cannot fail checks nothing)."""
  bad = tmp_path / 'bad.py'
  bad.write_text('def f():\n  from tmdm.training import loop\n')
  found = list(_imports('tmdm.data.bad', bad))
  assert 'tmdm.training.loop' in found and LAYER[_part(found[0])] > LAYER['data']


# Helpers that two layers' roles both need live below both, each defined once, in its home; and
# edges the layer order allows but the roles do not (the optimizer needs the model's config, not
# its layers). These once crossed: the samplers took `restrict` from model/transformer.py, and
# optim.py took `param_groups` from it.
HOMES = {'restrict': 'tmdm.vocab', 'param_group': 'tmdm.model.config', 'param_groups': 'tmdm.model.config'}
FORBIDDEN = {'tmdm.optim': ('tmdm.model.transformer', 'tmdm.model.layers')}


def _defines(path):
  return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def _defined_in(name, modules):
  return sorted(m for m, path in modules.items() if name in _defines(path))


@pytest.mark.parametrize('name', sorted(HOMES))
def test_shared_helpers_are_defined_once_below_their_users(name):
  assert _defined_in(name, MODULES) == [HOMES[name]]


def test_forbidden_edges():
  for module, targets in FORBIDDEN.items():
    assert not set(GRAPH[module]) & set(targets), f'{module} imports {set(GRAPH[module]) & set(targets)}'


def test_the_checker_sees_a_helper_back_in_the_transformer(tmp_path):
  """A second `restrict` in model/transformer.py, or optim importing it again, would be caught."""
  copy = tmp_path / 'transformer.py'
  copy.write_text(MODULES['tmdm.model.transformer'].read_text() + '\n\ndef restrict(a, b, c):\n  return a\n')
  assert _defined_in('restrict', {**MODULES, 'tmdm.model.transformer': copy}) != [HOMES['restrict']]
  bad = tmp_path / 'optim.py'
  bad.write_text('from tmdm.model import transformer\n')
  assert set(_imports('tmdm.optim', bad)) & set(FORBIDDEN['tmdm.optim'])
