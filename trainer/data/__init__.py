"""From shard files to training and evaluation batches.

    shardset      the shard-set folder (manifest, vocabularies, urls), mixing sets, image id hashes
    samples       what a sample holds and what can be wrong with one (BAD_KINDS, BadSample, counting, parse_meta)
    pictures      picture -> square normalised tensor (pixels: the normalisation, a leaf the model reads too)
    decode        a sample's image input: picture or region features (RegionSpec), checked; check_image_input
    text          caption tokenizers (the shard set's words, or a text encoder's own)
    collate       per-sample tensors -> padded batch tensors
    shardstream   one worker's raw-sample stream whose position can be saved and restored
    stream        one rank's training stream (TrainStream, StreamSettings): decoded, counted, full batches
    loader        the run's TrainLoader: workers for the whole run, state_dict for an exact resume
    eval_samples  an evaluation split read in order
"""
