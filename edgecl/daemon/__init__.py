"""`edgecl learn`: the daemon that ingests a sample stream, learns it in one pass, checkpoints,
and publishes each task's model (`service.LearnService` puts it together)."""
