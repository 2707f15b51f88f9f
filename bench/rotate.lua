-- wrk script for Fractal benchmarks: every request carries the next credential (and body) from a file, so load
-- comes from many distinct users (or hosts), and done() prints the figures as one JSON line.
--
--   wrk -t2 -c16 -d20s -s bench/rotate.lua http://127.0.0.1:PORT -- METHOD PATH FILE
--
-- FILE holds one request per line: "<bearer credential>\t<body>" (the body may be empty). Each wrk thread
-- takes every n-th line (n = number of threads), so threads never send the same credential at once.

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("id", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

local requests = {}
local position = 0

function init(args)
   local method, path, file = args[1], args[2], args[3]
   local nthreads = tonumber(args[4]) or 1
   local me = tonumber(id) or 0  -- the global set by setup() for this thread
   local n = 0
   for line in io.lines(file) do
      if n % nthreads == me then
         local tab = string.find(line, "\t", 1, true)
         local credential, body = line, nil
         if tab then
            credential = string.sub(line, 1, tab - 1)
            body = string.sub(line, tab + 1)
            if body == "" then body = nil end
         end
         local headers = { ["Authorization"] = "Bearer " .. credential }
         if body then headers["Content-Type"] = "application/json" end
         -- Pre-built once: per request only a table index, so wrk's own CPU stays small on a shared machine.
         table.insert(requests, wrk.format(method, path, headers, body))
      end
      n = n + 1
   end
   if #requests == 0 then
      error("no requests for thread " .. me .. " in " .. file)
   end
   position = me
end

function request()
   position = position + 1
   if position > #requests then position = 1 end
   return requests[position]
end

function done(summary, latency, requests_)
   local errors = summary.errors
   io.write(string.format(
      'WRK_JSON {"duration_us": %d, "requests": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, '
         .. '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, "latency_mean_us": %.1f, '
         .. '"latency_max_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d}\n',
      summary.duration, summary.requests, summary.bytes, errors.connect, errors.read, errors.write,
      errors.status, errors.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99)))
end
