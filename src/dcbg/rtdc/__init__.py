"""RT-DC files: reading frames, writing backgrounds, and outputs that never lose data

One module per job:

- :mod:`~dcbg.rtdc.reader`: find ``events/image`` (in the file or through
  its basins) and read it batch by batch;
- :mod:`~dcbg.rtdc.writer`: write ``events/image_bg`` and the metadata of a
  new output;
- :mod:`~dcbg.rtdc.output`: new outputs under a temporary name, in-place
  swaps, locks;
- :mod:`~dcbg.rtdc.chunks`: HDF5 chunks decoded and encoded in a thread
  pool, so reading and writing use every core;
- :mod:`~dcbg.rtdc.describe`: what a file carries, as ``dcbg info FILE``
  prints it;
- :mod:`~dcbg.rtdc.basins`, :mod:`~dcbg.rtdc.hdf5`: the conventions of
  the format; :mod:`~dcbg.rtdc.metadata_check`: metadata read in a child process
  first, for files on which libhdf5 itself hangs or crashes.
"""
