"""`cxr-runtime eval`: the report (evaluate), distribution metrics on image features (metrics),
the memorization audit (memorization) and the data-copying test (copying).
"""
