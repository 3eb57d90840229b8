"""What counts as an input image file: one rule for training layouts, batch scoring and `explain`.

Image extensions are inputs, and so are files without an extension or named by a DICOM UID
(`1.2.840...`), as PACS exports write them: the decoder, not the name, tells DICOM from anything
else, and a file that is not an image becomes an error value there. Hidden files and folders
(`.DS_Store`, macOS `._x.jpg`, `.Trash/`, `__MACOSX/`) are never inputs.
"""

from __future__ import annotations

import posixpath

from eyeray import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm")
HIDDEN_FOLDERS = ("__MACOSX",)  # zip tools add it beside the data; treated like a dot-folder


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in HIDDEN_FOLDERS


def skip_reason(relative_path: str) -> str | None:
    """Why a file (its path below the folder being read) is not an input image; None when it is."""
    *folders, name = relative_path.strip("/").split("/")
    if any(map(is_hidden, folders)):
        return "in a hidden folder"
    if name.startswith("."):
        return "hidden file"
    extension = posixpath.splitext(name)[1].lower()
    if extension in IMAGE_EXTENSIONS or extension == "" or extension[1:].isdigit():
        return None
    return f"not an image ({extension})"


def list_inputs(uri: str) -> list[str]:
    """Every input image file under `uri` (local or s3://), recursive, sorted, as URIs. Only the
    path list is held, so an archive of millions of files lists in bounded memory per path."""
    fs, root = storage.filesystem(uri)
    if not fs.exists(root):
        raise FileNotFoundError(f"{uri} does not exist (or is not readable with these credentials)")
    found = []
    for path in fs.find(root):
        relative = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        if skip_reason(relative) is None:
            found.append(storage.to_uri(fs, path))
    return sorted(found)
