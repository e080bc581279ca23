"""Code the tests share: test data, file digests, stand-ins for CuPy and the GPU"""
