"""Bind ``amips.kernels`` to the top-level ``kernels/`` folder of a source tree.

An installed amips carries ``amips/kernels`` (``package-dir`` in pyproject maps the
repository's ``kernels/`` there). A plain copy of the tree (a ``git archive``, a checkout
without ``pip install``) has ``kernels/`` beside ``amips/`` instead, so ``import
amips.kernels`` would fail, or, worse, pick up another checkout's kernels through an
editable install's finder. :func:`bind` loads the sibling folder as ``amips.kernels``
whenever ``amips/kernels`` does not exist, so the kernels always come from the same tree
as the ``amips`` that imports them. Standard library only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def bind() -> None:
    if "amips.kernels" in sys.modules:
        return
    here = Path(__file__).resolve().parent
    if (here / "kernels" / "__init__.py").is_file():
        return  # installed layout: the normal import system finds it
    source = here.parent / "kernels"
    init = source / "__init__.py"
    if not init.is_file():
        return  # neither layout: let ``import amips.kernels`` raise its own error
    spec = importlib.util.spec_from_file_location("amips.kernels", init,
                                                  submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["amips.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["amips.kernels"]
        raise
    sys.modules["amips"].kernels = module


bind()
