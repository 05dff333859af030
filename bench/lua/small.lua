-- wrk script for bench/compare.py: 4 KiB objects, GET or PUT.
--
-- Arguments after `--`: the operation (GET or PUT), the path prefix (ending in "/") and the
-- Authorization header value.
-- GET: the objects <prefix>k0 .. <prefix>k999 must exist (the harness uploads them first);
-- each thread (numbered by setup, which seeds its random sequence) picks keys at random.
-- PUT: each thread writes the keys <prefix>t<thread>-k<0..999> in turn, a 4 KiB body each.
-- done() prints one line, "BENCH-JSON {...}", which the harness parses: requests, duration,
-- errors (socket errors and every non-2xx status, by status) and the latency percentiles in
-- microseconds.

local threads = {}
local next_id = 1

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function init(args)
   operation = args[1]
   prefix = args[2]
   wrk.headers["Authorization"] = args[3]
   if operation == "PUT" then
      wrk.headers["Content-Type"] = "application/octet-stream"
      payload = string.rep("b", 4096)
   end
   math.randomseed(id * 7919)
   sent = 0
   statuses = {}
end

function request()
   if operation == "PUT" then
      sent = sent + 1
      return wrk.format("PUT", prefix .. "t" .. id .. "-k" .. (sent % 1000), nil, payload)
   end
   return wrk.format("GET", prefix .. "k" .. math.random(0, 999))
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local counts, non2xx = {}, 0
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses") or {}) do
         counts[status] = (counts[status] or 0) + count
         if status < 200 or status > 299 then
            non2xx = non2xx + count
         end
      end
   end
   local parts = {}
   for status, count in pairs(counts) do
      table.insert(parts, string.format('"%d": %.0f', status, count))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH-JSON {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, ' ..
      '"connect_errors": %.0f, "read_errors": %.0f, "write_errors": %.0f, ' ..
      '"timeouts": %.0f, "non2xx": %.0f, "statuses": {%s}, ' ..
      '"p50_us": %.0f, "p99_us": %.0f, "mean_us": %.1f, "max_us": %.0f}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.timeout, non2xx, table.concat(parts, ", "),
      latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
