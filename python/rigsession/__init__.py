"""Load rigd session folders (docs/session-format.md) and export them to NWB.

``load_session(path)`` opens one session folder, ``load_mouse(path)`` every
session of a mouse. numpy is required; pandas (``Table.to_pandas()``) and the
NWB export (``pip install 'rigsession[nwb]'``) are optional.
"""

__version__ = "0.1.0"

from .session import Session, Stream, Table, load_mouse, load_session, read_tsv  # noqa: E402

__all__ = ["Session", "Stream", "Table", "load_mouse", "load_session", "read_tsv", "__version__"]
