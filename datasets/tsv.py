"""The original's TSV layout (``--tsv_mode True``): ``--data_path`` is a folder with ``train.tsv``, or with a
``train/`` folder of .tsv files, or a folder of .tsv files, or one .tsv file. Each line is
``key<TAB>label<TAB>base64 image``; beside each ``X.tsv`` lies ``X.lineidx``, the byte offset of every line, one
per line (the original's index; ``write_tsv`` writes both). Lines are read lazily by offset, each process opening
its own file handles. Labels are not read: pre-training does not use them (targets are -1).

``chunk_sizes`` (lines per file) drive ``--sampler chunk`` (datasets/samplers.py).
"""
import base64
import binascii
import glob
import io
import os

from .folder import DataError, RobustImageDataset


def tsv_files(data_path):
    """The .tsv files of ``data_path`` in the original's layouts, sorted."""
    if os.path.isfile(data_path):
        return [data_path]
    if not os.path.isdir(data_path):
        raise DataError(f"TSV data path {data_path} does not exist")
    if os.path.isfile(os.path.join(data_path, 'train.tsv')):
        return [os.path.join(data_path, 'train.tsv')]
    for folder in (os.path.join(data_path, 'train'), data_path):
        files = sorted(glob.glob(os.path.join(folder, '*.tsv')))
        if files:
            return files
    raise DataError(f"no train.tsv, train/*.tsv or *.tsv in {data_path}")


def read_lineidx(tsv_path):
    """Byte offsets of the lines of ``tsv_path`` from the .lineidx file beside it."""
    index_path = os.path.splitext(tsv_path)[0] + '.lineidx'
    if not os.path.isfile(index_path):
        raise DataError(f"{tsv_path} has no line index {index_path} (byte offset of each line; "
                        f"datasets.tsv.write_lineidx writes it)")
    try:
        with open(index_path) as lines:
            return [int(line) for line in lines if line.strip()]
    except ValueError:
        raise DataError(f"line index {index_path} holds something other than byte offsets") from None


def write_lineidx(tsv_path):
    """Write the .lineidx of ``tsv_path`` (as the original's generate_lineidx)."""
    offsets, position = [], 0
    with open(tsv_path, 'rb') as lines:
        for line in lines:
            offsets.append(position)
            position += len(line)
    with open(os.path.splitext(tsv_path)[0] + '.lineidx', 'w') as index:
        index.writelines(f"{offset}\n" for offset in offsets)


def write_tsv(tsv_path, rows):
    """A .tsv of ``rows`` [(key, label, image file bytes)] and its .lineidx."""
    with open(tsv_path, 'w') as out:
        for key, label, image_bytes in rows:
            out.write(f"{key}\t{label}\t{base64.b64encode(image_bytes).decode('ascii')}\n")
    write_lineidx(tsv_path)


class TSVDataset(RobustImageDataset):
    """Images of the original's TSV files; a sample is (file index, byte offset of its line)."""

    def __init__(self, data_path, transform=None, on_bad_image='skip'):
        self.root, self.transform, self.target_transform = os.fspath(data_path), transform, None
        self.files = tsv_files(self.root)
        offsets = [read_lineidx(path) for path in self.files]
        self.chunk_sizes = [len(file_offsets) for file_offsets in offsets]
        self.samples = [((file_index, offset), -1) for file_index, file_offsets in enumerate(offsets)
                        for offset in file_offsets]
        if not self.samples:
            raise DataError(f"the TSV files of {self.root} hold no lines")
        self.targets, self.classes = [-1] * len(self.samples), []
        self._handles, self._handles_pid = {}, None
        self._init_bad_image_policy(on_bad_image)

    def read_image(self, sample):
        file_index, offset = sample
        if self._handles_pid != os.getpid():
            self._handles, self._handles_pid = {}, os.getpid()
        if file_index not in self._handles:
            self._handles[file_index] = open(self.files[file_index], 'rb')
        handle = self._handles[file_index]
        handle.seek(offset)
        columns = handle.readline().rstrip(b'\r\n').split(b'\t')
        if len(columns) < 3:
            raise ValueError(f"{len(columns)} tab-separated columns, expected key, label, base64 image")
        try:
            image_bytes = base64.b64decode(columns[2], validate=True)
        except binascii.Error as error:
            raise ValueError(f"the image column is not base64 ({error})") from None
        return self.decode(io.BytesIO(image_bytes))

    def describe(self, sample):
        file_index, offset = sample
        return f"the line at byte {offset} of {self.files[file_index]}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_handles'], state['_handles_pid'] = {}, None
        return state
