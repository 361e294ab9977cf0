"""The documentation as a reader follows it: every relative link of README.md
and docs/*.md leads to a file of the repository (and, with #anchor, to a
heading of that file), and the README stays a short entry point."""

import re
import urllib.parse

import pytest

from conftest import documentation_files

README_MAX_LINES = 300

LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')   # [text](target) and ![alt](target "title")
FENCE = re.compile(r'^(```|~~~).*?^\1', re.M | re.S)
INLINE_CODE = re.compile(r'`[^`\n]*`')


def prose(text):
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub('', FENCE.sub('', text))


def links(text):
    """Targets of the markdown links of `text`, in order."""
    return LINK.findall(prose(text))


def anchors(text):
    """The anchors GitHub gives the headings of a markdown text: lower case,
    punctuation other than '-' and '_' removed, spaces as '-', repeats numbered."""
    seen, result = {}, set()
    for heading in re.findall(r'^#{1,6}\s+(.+?)\s*#*\s*$', FENCE.sub('', text), re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.replace('`', '').lower()).replace(' ', '-')
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f'{slug}-{count}')
    return result


def broken_links(path, root):
    """'target (why)' for each relative link of the file at `path` that leads nowhere."""
    broken = []
    for target in links(path.read_text()):
        if urllib.parse.urlsplit(target).scheme:   # https:, mailto:
            continue
        file_part, _, anchor = target.partition('#')
        dest = (path.parent / urllib.parse.unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            broken.append(f'{target} (no file {dest})')
        elif root.resolve() not in dest.parents and dest != root.resolve():
            broken.append(f'{target} (outside the repository)')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest.read_text()):
            broken.append(f'{target} (no heading #{anchor} in {dest.name})')
    return broken


@pytest.mark.parametrize('path', documentation_files(), ids=lambda path: path.name)
def test_every_relative_link_resolves(path, repo_root):
    assert not broken_links(path, repo_root), broken_links(path, repo_root)


def test_readme_is_short(repo_root):
    lines = (repo_root / 'README.md').read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines; move details to docs/'


def test_readme_links_every_guide(repo_root):
    """Each guide under docs/ is reachable from the README."""
    linked = {(repo_root / target.partition('#')[0]).resolve()
              for target in links((repo_root / 'README.md').read_text())}
    unlinked = [path.name for path in documentation_files()[1:] if path.resolve() not in linked]
    assert not unlinked, f'README.md links none of {unlinked}'


# ----------------------------------------------------------------------------
# The checker itself finds what is wrong.

def test_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    root = tmp_path / 'repo'
    (root / 'docs').mkdir(parents=True)
    (root / 'docs' / 'A.md').write_text('# A guide\n\n## Post-hoc EMA\n\n## `--ema` flags (EDM)\n')
    page = root / 'README.md'
    page.write_text('[ok](docs/A.md) [ok](docs/A.md#post-hoc-ema) [ok](docs/A.md#--ema-flags-edm) '
                    '[ok](https://example.org/x.md) `[not a link](nowhere.md)`\n'
                    '```\n[not a link](nowhere.md)\n```\n'
                    '[bad](docs/B.md) [bad](docs/A.md#fid) [bad](#top) [bad](../outside.md)\n')
    (tmp_path / 'outside.md').write_text('# x\n')
    broken = broken_links(page, root)
    assert [entry.split()[0] for entry in broken] == ['docs/B.md', 'docs/A.md#fid', '#top', '../outside.md'], broken


def test_anchors_number_repeated_headings():
    assert anchors('# Guide\n## Flags\n## Flags\n### 2. Patch Diffusion\n') == {
        'guide', 'flags', 'flags-1', '2-patch-diffusion'}
