-- wrk script of the yardsticks (bench/yardsticks.py): every line of FILE is one whole request, so one phase can mix
-- methods and paths (assigns, deletes) and give each request its own token and Idempotency-Key.
--
--   wrk -t2 -c16 -d15s -s bench/requests.lua http://127.0.0.1:PORT -- FILE THREADS
--
-- FILE: one request per line, "METHOD\tPATH\tBEARER\tIDEMPOTENCY_KEY\tBODY" (empty fields: no such header, no
-- body). Each wrk thread takes every n-th line (n = THREADS) and sends its lines once each, in order; a thread
-- that runs out starts over (the harness reports that as reused lines). done() prints the figures as one JSON
-- line, with the answers counted by status class (2xx, 429, 503, other).

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("id", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

local requests = {}
local position = 0
ok, limited, busy, other = 0, 0, 0, 0

local function split(line)
   local fields, start = {}, 1
   while true do
      local tab = string.find(line, "\t", start, true)
      if not tab then
         table.insert(fields, string.sub(line, start))
         return fields
      end
      table.insert(fields, string.sub(line, start, tab - 1))
      start = tab + 1
   end
end

function init(args)
   local file = args[1]
   local nthreads = tonumber(args[2]) or 1
   local me = tonumber(id) or 0  -- the global set by setup() for this thread
   local n = 0
   for line in io.lines(file) do
      if n % nthreads == me then
         local f = split(line)
         local method, path, bearer, key, body = f[1], f[2], f[3] or "", f[4] or "", f[5] or ""
         local headers = {}
         if bearer ~= "" then headers["Authorization"] = "Bearer " .. bearer end
         if key ~= "" then headers["Idempotency-Key"] = key end
         if body ~= "" then headers["Content-Type"] = "application/json" else body = nil end
         -- Pre-built once: per request only a table index, so wrk's own CPU stays small on a shared machine.
         table.insert(requests, wrk.format(method, path, headers, body))
      end
      n = n + 1
   end
   if #requests == 0 then
      error("no requests for thread " .. me .. " in " .. file)
   end
end

function request()
   position = position + 1
   if position > #requests then position = 1 end
   return requests[position]
end

function response(status, headers, body)
   if status >= 200 and status < 300 then ok = ok + 1
   elseif status == 429 then limited = limited + 1
   elseif status == 503 then busy = busy + 1
   else other = other + 1 end
end

function done(summary, latency, requests_)
   local errors = summary.errors
   local s_ok, s_limited, s_busy, s_other = 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      s_ok = s_ok + (thread:get("ok") or 0)
      s_limited = s_limited + (thread:get("limited") or 0)
      s_busy = s_busy + (thread:get("busy") or 0)
      s_other = s_other + (thread:get("other") or 0)
   end
   io.write(string.format(
      'WRK_JSON {"duration_us": %d, "requests": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, '
         .. '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, "latency_mean_us": %.1f, '
         .. '"latency_max_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
         .. '"status_2xx": %d, "status_429": %d, "status_503": %d, "status_other": %d}\n',
      summary.duration, summary.requests, summary.bytes, errors.connect, errors.read, errors.write,
      errors.status, errors.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), s_ok, s_limited, s_busy, s_other))
end
