"""Build datasets/demo/fashion_mnist_demo.zip from the Fashion-MNIST IDX files.

    apt-get install -y dataset-fashion-mnist
    python scripts/make_demo_data.py

train/ = the first 200 images per class of the train split, val/ = the first 100 per class of the test
split, as PNGs in class folders. The zip is deterministic (sorted members, fixed timestamps), so rebuilding
gives the same bytes.
"""
import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.fashion_mnist import DEMO_SPLITS, DEMO_ZIP, FASHION_MNIST_DIR, fashion_mnist_folder  # noqa: E402
from utils import HelpFormatter  # noqa: E402

FIXED_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


def write_zip(folder, zip_path):
    """Zip every file under `folder` (paths relative to it), deterministically; PNGs are stored as is."""
    with zipfile.ZipFile(zip_path, 'w') as archive:
        for path in sorted(p for p in folder.rglob('*.png')):
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=FIXED_TIMESTAMP)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--source', type=Path, default=FASHION_MNIST_DIR, help='folder of the IDX .gz files')
    parser.add_argument('--out', type=Path, default=DEMO_ZIP, help='zip file to write')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        for demo_split, (source_split, per_class) in DEMO_SPLITS.items():
            fashion_mnist_folder(args.source, source_split, staging / demo_split, per_class=per_class)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_zip(staging, args.out)
    with zipfile.ZipFile(args.out) as archive:
        count = len(archive.namelist())
    print(f"wrote {args.out}: {count} images, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == '__main__':
    main()
