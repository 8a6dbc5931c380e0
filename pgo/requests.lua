-- Ends a wrk run (one thread) after REQUESTS responses, so a profile weighs the same
-- number of requests against start-up whatever the speed of the host (pgo/profile.sh).
local limit = tonumber(os.getenv("REQUESTS"))
local seen = 0

function response()
  seen = seen + 1
  if seen >= limit then
    wrk.thread:stop()
  end
end
