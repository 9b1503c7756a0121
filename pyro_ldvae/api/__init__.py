"""The AnnData-level API: LinearSCVI, saving and loading, the command line, scanpy-style tl and pl."""
