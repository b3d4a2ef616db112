"""What members press and fill in: persistent buttons (their custom_id carries the job, so
they work after a restart), forms (modals), the /settings panel. A new button goes here, its
handling in the cog of its feature."""
