"""What ssl-tune shows: the trial table while a search runs (`console`), figures (`figures`), the leaderboard and
the next commands when it ends (`summary`), `validate`'s plan (`preview`) and the commands it prints (`shell`)."""
