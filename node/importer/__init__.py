"""aquila.node.importer: the `aquila import` command, a client of the REST API: it talks HTTP
to any node, like the admin commands, and shares nothing with the server but the model.

    sources   reading .jsonl and .npy (+ ids, + metadata) in checked batches
    upload    the columnar upsert over aiohttp, retries, bad rows found by halving
    state     the progress file that lets a rerun finish an interrupted import
    progress  a bar on a terminal, plain lines otherwise
    command   the arguments and the pipeline: one reader, several uploaders

May import: aquila.cluster.model, aquila.cluster.admin (its address and error helpers).
"""
