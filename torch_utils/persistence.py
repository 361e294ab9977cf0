"""Network pickles that carry the source code of their classes.

The format is the one of EDM and the official Patch Diffusion code (docs/DESIGN.md
section 4): an instance of a class decorated with `persistent_class` pickles
as a call `_reconstruct_persistent_obj(meta)` with

    meta = {type: 'class', version: 6, module_src: <source text of the
            defining module>, class_name: <name>, state: <obj.__dict__>}

Unpickling runs `module_src` as a fresh module (one per distinct source; a
source equal to a live module's reuses that module) and rebuilds the object
from `state`. So a pickle keeps working when the code that wrote it has
changed or is gone -- and loading one RUNS CODE: only load files you trust.
"""

import copy
import inspect
import pickle
import sys
import types
import uuid

from dnnlib.util import EasyDict

_FORMAT_VERSION = 6
_live_module_names = set()     # modules whose classes were decorated here
_src_to_module = {}            # module source text -> module object
_module_to_src = {}            # module name -> module source text


def persistent_class(orig_class):
    """Class decorator: instances pickle with their module's source code.

    The decorated class records its constructor arguments, available as
    `obj.init_args` (tuple) and `obj.init_kwargs` (EasyDict), so an object
    can be rebuilt with the same configuration.
    """
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class
    module_src = _source_of_module(sys.modules[orig_class.__module__])

    class Decorator(orig_class):
        _orig_module_src = module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            init_args = copy.deepcopy(args)
            init_kwargs = copy.deepcopy(kwargs)
            super().__init__(*args, **kwargs)
            self._init_args = init_args
            self._init_kwargs = init_kwargs

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            getstate = getattr(super(), '__getstate__', None)
            state = getstate() if callable(getstate) else self.__dict__
            meta = dict(type='class', version=_FORMAT_VERSION, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    return Decorator


def is_persistent(obj):
    """True for a persistent class or an instance of one."""
    cls = obj if isinstance(obj, type) else type(obj)
    return '_orig_module_src' in cls.__dict__ and '_orig_class_name' in cls.__dict__


def _source_of_module(module):
    name = module.__name__
    if name not in _module_to_src:
        src = inspect.getsource(module)
        _module_to_src[name] = src
        _src_to_module.setdefault(src, module)
    return _module_to_src[name]


def _module_from_source(src):
    """The module for `src`: a live one with that source, else a fresh one."""
    module = _src_to_module.get(src)
    if module is None:
        name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(name)
        sys.modules[name] = module
        _module_to_src[name] = src
        _src_to_module[src] = module
        try:
            exec(compile(src, f'<persistent module {name}>', 'exec'), module.__dict__)  # noqa: S102 (documented: pickles run code)
        except BaseException:
            del _src_to_module[src]
            raise
    return module


def _reconstruct_persistent_obj(meta):
    """Rebuild an object from its pickled `meta` (see the module docstring)."""
    meta = EasyDict(meta)
    meta.state = EasyDict(meta.state)
    if meta.get('version') != _FORMAT_VERSION:
        raise ValueError(f'Unsupported persistent object version {meta.get("version")!r} '
                         f'(this code reads version {_FORMAT_VERSION})')
    if meta.get('type') != 'class':
        raise ValueError(f'Unsupported persistent object type {meta.get("type")!r}')
    module = _module_from_source(meta.module_src)
    if meta.class_name not in module.__dict__:
        raise ValueError(f'Persistent class {meta.class_name!r} is not defined in its embedded source')
    cls = persistent_class(module.__dict__[meta.class_name])
    obj = cls.__new__(cls)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(dict(meta.state))
    else:
        obj.__dict__.update(meta.state)
    return obj


TRUST_NOTE = ('Note: loading a pickle runs the code inside it; only load .pkl files from sources you trust '
              '(.safetensors snapshots hold no code).')
_trust_note_shown = False


def load_network_pickle(f):
    """Unpickle a network pickle (ours, EDM's or the official Patch Diffusion's)
    from an open binary file. It runs the code embedded in the file; the
    first call of a process prints TRUST_NOTE."""
    global _trust_note_shown
    if not _trust_note_shown:
        print(TRUST_NOTE, flush=True)
        _trust_note_shown = True
    return pickle.load(f)
