# Fails unless every external symbol defined by one ISA path's object files carries the path's tag
# (cmake/moelb_isa.cmake). An untagged one -- say an inline std:: or Eigen function emitted out of
# line -- has the same name as a copy compiled for another path, and the linker keeps one of them
# for all callers: possibly the AVX-512 copy for a CPU without AVX-512.
#
#   cmake -DNM=nm -DTAG=isa_avx2 -DOBJECTS="a.o|b.o" -DSTAMP=ok.stamp -P check_isa_symbols.cmake
foreach(var NM TAG OBJECTS STAMP)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_isa_symbols.cmake needs -D${var}=...")
  endif()
endforeach()

string(REPLACE "|" ";" objects "${OBJECTS}")
set(leaks "")
set(count 0)
foreach(object IN LISTS objects)
  execute_process(COMMAND ${NM} --defined-only --extern-only --format=posix ${object}
                  OUTPUT_VARIABLE listing RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${object}: ${err}")
  endif()
  string(REPLACE "\n" ";" lines "${listing}")
  foreach(line IN LISTS lines)
    # POSIX format: "name type [value size]".
    if(line MATCHES "^([^ ]+) ([A-Za-z]) ")
      set(name "${CMAKE_MATCH_1}")
      set(type "${CMAKE_MATCH_2}")
      math(EXPR count "${count} + 1")
      # DW.ref.__gxx_personality_v0: the exception tables' pointer to the personality routine,
      # data with the same value in every object file.
      if(NOT name MATCHES "${TAG}" AND NOT name MATCHES "^DW\\.ref\\.")
        list(APPEND leaks "${name} (${type}) in ${object}")
      endif()
    endif()
  endforeach()
endforeach()

if(leaks)
  list(JOIN leaks "\n  " shown)
  message(FATAL_ERROR "ISA path ${TAG}: external symbols without the tag '${TAG}' (c++filt "
                      "demangles them); give them this path's namespace or internal linkage:\n"
                      "  ${shown}")
endif()
if(count EQUAL 0)
  message(FATAL_ERROR "ISA path ${TAG}: no external symbols found in ${OBJECTS}")
endif()
file(TOUCH ${STAMP})
