-- Each request asks for something the gateway has not seen: MODE `ips` comes from a new
-- client address (X-Forwarded-For, 10.0.0.0 + n; the gateway trusts loopback as a
-- proxy), MODE `urls` asks for a new cacheable URL (/api/search?q=n). n counts up from
-- OFFSET, each wrk thread taking every THREADS-th value, so no two requests repeat.
-- Arguments: MODE THREADS OFFSET. (wrk's LuaJIT: arithmetic, no bit operators.)
local counter, base, stride, offset, mode = 0, 0, 1, 0, "ips"
local next_base = 0

function setup(thread)
  thread:set("base", next_base)
  next_base = next_base + 1
end

function init(args)
  mode = args[1] or "ips"
  stride = tonumber(args[2]) or 1
  offset = tonumber(args[3]) or 0
end

function request()
  local n = offset + base + counter * stride
  counter = counter + 1
  if mode == "urls" then
    return wrk.format("GET", "/api/search?q=" .. n)
  end
  local ip = string.format("%d.%d.%d.%d", 10 + math.floor(n / 16777216),
    math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
  return wrk.format("GET", "/health", { ["X-Forwarded-For"] = ip })
end
