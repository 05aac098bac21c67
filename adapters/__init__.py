"""I/O adapters shared by the components: one module per foreign engine or outside concern.

``torrent`` (libtorrent: make, check, run), ``origin`` (file and S3 origins; boto3),
``http`` (the aiohttp JSON client), ``xxh3`` (file hashing), ``terminal`` (progress bars).
Components call these narrow interfaces; nothing else imports the engines behind them.
"""
