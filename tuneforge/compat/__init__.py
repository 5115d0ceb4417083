"""Every private API of a dependency that tuneforge uses, one small module per dependency.

When a dependency changes one of these, the fix is here and nowhere else; each function says what it
reaches into and why no public API does the job.
"""
