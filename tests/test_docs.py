"""The docs name only what exists: every link, repo path, `tmdm` subcommand and flag, `--config.` key
and `python -m` module written in README.md, BUILD_NOTES.md and docs/**/*.md. A planted dead reference of each kind
must be reported (a checker that cannot fail checks nothing)."""

import argparse
import functools
import pathlib
import re

import pytest

from tmdm import cli
from tmdm.config import base as base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', ROOT / 'BUILD_NOTES.md', *sorted((ROOT / 'docs').rglob('*.md'))]

LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^```[^\n]*\n(.*?)^```', re.M | re.S)
INLINE = re.compile(r'`([^`\n]+)`')
PATH = re.compile(r'(?<![\w./-])((?:src|tests|launch|experiments|docs|studies|\.ci)/[\w./*{}<>-]*'
                  r'|README\.md|BUILD_NOTES\.md|pyproject\.toml)')
COMMAND = re.compile(r'(?<![\w./-])(?<!from )tmdm\s+([a-z][a-z-]*)(.*)')
FLAG = re.compile(r'(?<![\w-])(--[a-z][\w-]*)')
CONFIG_KEY = re.compile(r'--config\.([a-z_][\w.]*)')
MODULE = re.compile(r'python\S*\s+-m\s+(tmdm(?:\.\w+)+)')
COMMON = {'--host_devices', '--help', '-h'}


def slug(heading):
  """GitHub's anchor of a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'."""
  text = re.sub(r'[`*]', '', heading.strip().lower())
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path):
  text = FENCE.sub('', path.read_text())
  return {slug(m) for m in re.findall(r'^#+\s+(.*)$', text, re.M)}


@functools.cache
def flags():
  """{subcommand: every option string it or its own subcommands accept}."""
  def collect(parser):
    out = set()
    for action in parser._actions:  # pylint: disable=protected-access
      out |= set(action.option_strings)
      if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
        for child in action.choices.values():
          out |= collect(child)
    return out
  top = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  return {name: collect(child) | COMMON for name, child in top.choices.items()}


@functools.cache
def config():
  return base_config.get_config()


def has_key(dotted):
  node = config()
  for part in dotted.rstrip('.').split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def placeholder(path):
  return any(c in path for c in '*{<') or '...' in path or any(
      re.fullmatch(r'[A-Z][A-Z0-9_]*(\.\w+)?', seg) for seg in path.split('/'))


def code_lines(text):
  """Each inline code span, and each line of a fenced block with `\\` continuations joined."""
  for block in FENCE.findall(text):
    yield from block.replace('\\\n', ' ').splitlines()
  yield from INLINE.findall(FENCE.sub('', text))


def problems(page, text):
  """What `text` (the content of `page`) names that does not exist, one line each."""
  out = []
  for target in LINK.findall(FENCE.sub('', text)):
    if re.match(r'[a-z]+:', target):
      continue
    file, _, anchor = target.partition('#')
    dest = (page.parent / file).resolve() if file else page
    if not dest.exists():
      out.append(f'link {target}: no such file')
    elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
      out.append(f'link {target}: no heading #{anchor}')
  for line in code_lines(text):
    for path in PATH.findall(line):
      path = path.rstrip('.,;:)').split(':')[0]
      if not placeholder(path) and not (ROOT / path).exists():
        out.append(f'path {path}: does not exist')
    for key in CONFIG_KEY.findall(line):
      if key.lower() != 'key' and not has_key(key):
        out.append(f'config key {key}: not in src/tmdm/config/base.py')
    for module in MODULE.findall(line):
      parts = module.split('.')
      if not (ROOT / 'src' / pathlib.Path(*parts)).with_suffix('.py').exists() and not (
          ROOT / 'src' / pathlib.Path(*parts) / '__init__.py').exists():
        out.append(f'module {module}: does not exist')
    for sub, rest in COMMAND.findall(line):
      if sub not in flags():
        out.append(f'tmdm {sub}: no such subcommand')
        continue
      rest = re.split(r'\s(?:\||&&|;|#)\s|(?<![\w-])tmdm\s', rest)[0]
      rest = re.sub(r"'[^']*'?|\"[^\"]*\"?", '', rest)  # Quoted values (e.g. --beam_options='--runner_flag=..').
      for flag in FLAG.findall(rest):
        if flag not in flags()[sub] and not flag.startswith('--config'):
          out.append(f'tmdm {sub} {flag}: no such flag')
  return out


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_reference_exists(page):
  assert not problems(page, page.read_text()), '\n'.join(problems(page, page.read_text()))


PLANTED = {
    'a dead link': ('[x](docs/no_such_page.md)', 'no such file'),
    'a dead anchor': ('[x](BUILD_NOTES.md#no-such-heading)', 'no heading'),
    'a dead path': ('`launch/no_such_script.py`', 'does not exist'),
    'a moved script': ('`python launch/study_schedules.py --workdir=RUN`', 'does not exist'),
    'an unknown subcommand': ('`tmdm trian --workdir=RUN`', 'no such subcommand'),
    'an unknown flag': ('```bash\ntmdm eval --workdir=RUN \\\n  --no_such_flag=1\n```', 'no such flag'),
    'an unknown config key': ('`tmdm train --config.train.no_such_key=1`', 'not in src/tmdm/config/base.py'),
    'an unknown module': ('`python -m tmdm.tools.no_such_tool`', 'does not exist'),
}


@pytest.mark.parametrize('name', sorted(PLANTED))
def test_the_checker_sees_a_planted_dead_reference(name):
  snippet, message = PLANTED[name]
  found = problems(ROOT / 'README.md', f'Some prose.\n\n{snippet}\n')
  assert len(found) == 1 and message in found[0], found


def test_the_checker_accepts_what_exists():
  text = ('[d](docs/own_data.md) `experiments/demo.py:quick` `experiments/FILE.py` `from tmdm import cli`\n'
          '```bash\ntmdm train --config=experiments/demo.py --workdir=RUN --host_devices=8 \\\n'
          '  --config.train.num_steps=100   # a comment with --anything\npython -m tmdm.tools.example_corpus DIR\n```\n')
  assert problems(ROOT / 'README.md', text) == []
