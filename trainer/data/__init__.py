"""From shard files to training and evaluation batches: the shard set, the resumable raw-sample stream,
decoding pictures, features and captions, collation, the stateful training loader and corpus mixing."""
