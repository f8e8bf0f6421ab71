-- wrk's script for bench/runtime.py: every request POSTs one film to /api/predict as a
-- multipart form, the films in turn (their paths are the script's arguments); at the end, one
-- line of JSON with the counts and the latency percentiles.
local boundary = "covidxray-bench-boundary"
local bodies, sent = {}, 0

function init(args)
  for index, path in ipairs(args) do
    local file = assert(io.open(path, "rb"))
    local data = file:read("*all")
    file:close()
    bodies[index] = "--" .. boundary .. "\r\n" ..
      'Content-Disposition: form-data; name="files"; filename="film.png"\r\n' ..
      "Content-Type: image/png\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
  end
end

function request()
  sent = sent + 1
  return wrk.format("POST", nil,
    {["Content-Type"] = "multipart/form-data; boundary=" .. boundary},
    bodies[((sent - 1) % #bodies) + 1])
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_ms": %.3f, "p95_ms": %.3f}\n', summary.requests, summary.duration / 1e6,
    errors.status, errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000))
end
