"""The image's entry point, /opt/app/inference.py, where the MIDOG organizers' re-run harness expects it.

Their timed copy, mounted over this file, wraps the ``main()`` call below. The contract (input, output, exit
codes, the model folder, ``MIDOG_DEVICE``) is process.py's docstring; the logic is process.py's alone.
"""

from process import main

if __name__ == "__main__":
    raise SystemExit(main())
