"""The Hugging Face hub and the local cache: what a variant needs, fetched, verified, kept.

- `hub`: talking to the hub (resolve, fetch with retries, hub errors explained as jmoshi's own);
- `artifacts`: where a variant's files are in the standard cache, what is missing, whether it is intact,
  and the download of what is missing (`download`, `verify`);
- `hashing`: sha256 of a file while it is still being written (downloads are checked as they arrive);
- `side_by_side`: a few downloads at once, the first error ending them all.

The rest of jmoshi goes through `artifacts` (doctor also reads `hub.offline_env`); `artifacts` stands on
`hub`, and huggingface_hub's wrapped internals (`upstream.hub_internals`) report to `hashing`.
"""
