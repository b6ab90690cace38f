"""Small synthetic chest X-ray datasets in the real NIH ChestX-ray14 and CheXphoto file formats.

The command line of chexnet/datatools/demo.py, where the code and the full usage live
(`python demo_data.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

from chexnet.datatools.demo import main

if __name__ == "__main__":
    main()
