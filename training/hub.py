"""Files on the Hugging Face Hub, addressed as hf://OWNER/REPO/FILE (or
hf://OWNER/REPO@REVISION/FILE, REVISION a branch, tag or commit hash).
`dnnlib.util.open_url` opens such addresses through `download`, so every
option that names a network or statistics file (generate.py --network,
train.py --transfer, fid.py --ref and --detector) takes one.

huggingface_hub does the fetching, as the well-kept implementation of the
Hub's cache: downloads go to its cache (HF_HUB_CACHE, else HF_HOME/hub,
else ~/.cache/huggingface/hub) and land there only when complete, with a
progress bar on a terminal and a cut transfer resumed; with
HF_HUB_OFFLINE=1 only the cache is read. It is an optional dependency
(pip install -e ".[hub]"), imported when an hf:// address is opened.
"""

import re

import dnnlib

EXAMPLE = 'hf://zhendongw/patch-diffusion/patch_diffusion_imagenet_1k_ckpt.pkl'   # the official ImageNet checkpoint
INSTALL_HINT = 'pip install huggingface_hub (or pip install -e ".[hub]")'

_ADDRESS = re.compile(r'hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?/(?P<file>.+)')
_FORM = f'write hf://OWNER/REPO/FILE or hf://OWNER/REPO@REVISION/FILE, e.g. {EXAMPLE}'


def parse(url):
    """Split a Hub address: 'hf://OWNER/REPO[@REVISION]/FILE' -> (repo_id
    'OWNER/REPO', filename 'FILE' (may contain folders, not . or ..),
    revision or None). ValueError that shows the form for anything else."""
    match = _ADDRESS.fullmatch(url)
    if match is None or any(part in ('', '.', '..') for part in match['file'].split('/')):
        raise ValueError(f'{url} is not a Hugging Face Hub address: {_FORM}')
    return match['repo'], match['file'], match['revision']


def download(url):
    """The local path of the file at Hub address `url` in the Hugging Face
    cache, downloaded first unless it is there (see the module docstring).

    Raises ValueError for a malformed address and when huggingface_hub is not
    installed, and dnnlib.util.DownloadError (an OSError) when the file
    cannot be had: not cached while HF_HUB_OFFLINE is set, the Hub
    unreachable, no such repository, revision or file, a failed transfer.
    Each message is one line that says what to do.
    """
    repo_id, filename, revision = parse(url)
    try:
        from huggingface_hub import constants, hf_hub_download, utils as hub_utils
    except ImportError as err:
        raise ValueError(f'{url}: files from the Hugging Face Hub need the huggingface_hub package ({err}); '
                         f'install it with: {INSTALL_HINT}') from None
    where = f'{filename} of {repo_id}' + (f' at revision {revision}' if revision else '')
    # The settings huggingface_hub read from the environment (HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT),
    # passed on explicitly, so that the messages below name what was used.
    cache, offline, endpoint = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, constants.ENDPOINT
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, local_files_only=offline,
                               endpoint=endpoint)
    except hub_utils.LocalEntryNotFoundError as err:   # not cached, and the Hub not asked or not reached
        if offline:
            raise dnnlib.util.DownloadError(
                f'{where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: '
                f'unset HF_HUB_OFFLINE to download it, or set HF_HUB_CACHE to a cache that holds it') from err
        raise dnnlib.util.DownloadError(
            f'Cannot reach the Hugging Face Hub ({endpoint}) to download {where}, and it is not in the '
            f'cache ({cache}): check the network connection, or download the file elsewhere '
            f'and pass its local path') from err
    except hub_utils.RepositoryNotFoundError as err:   # also private and gated repositories without a token
        raise dnnlib.util.DownloadError(
            f'The Hugging Face Hub has no repository {repo_id} that this machine may read: check {url}; '
            f'for a private or gated repository set HF_TOKEN to a token with access') from err
    except hub_utils.RevisionNotFoundError as err:
        raise dnnlib.util.DownloadError(
            f'{repo_id} on the Hugging Face Hub has no revision {revision}: check {url}') from err
    except hub_utils.EntryNotFoundError as err:
        raise dnnlib.util.DownloadError(
            f'The Hugging Face Hub has no file {where}: check {url} against the files listed at '
            f'{endpoint}/{repo_id}/tree/{revision or "main"}') from err
    except ValueError as err:   # huggingface_hub's checks of the repository id and the file name
        raise ValueError(f'{url} is not a valid Hugging Face Hub address ({dnnlib.util.one_line(err)}); '
                         f'{_FORM}') from err
    except Exception as err:   # a failed transfer: HTTP errors (requests' or httpx's types, by version), a full disk
        raise dnnlib.util.DownloadError(
            f'Cannot download {where} from the Hugging Face Hub ({type(err).__name__}: '
            f'{dnnlib.util.one_line(err)}); try again, or download the file elsewhere and pass its local path') from err
