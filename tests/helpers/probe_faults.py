"""The metadata probe, hanging or crashing for files named so (as libhdf5 may)

``python probe_faults.py FILE`` sleeps for ``hangs.rtdc``, kills itself with
SIGSEGV for ``crashes.rtdc`` and runs the real probe for anything else.
"""
import os
import signal
import sys
import time

from dcbg.rtdc.metadata_check import read_metadata

if __name__ == "__main__":
    name = os.path.basename(sys.argv[1])
    if name == "hangs.rtdc":
        time.sleep(60)
    if name == "crashes.rtdc":
        os.kill(os.getpid(), signal.SIGSEGV)
    read_metadata(sys.argv[1])
